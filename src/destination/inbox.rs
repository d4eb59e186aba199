//! The session worker's inbox. The pump (the socket reader) hands the worker every frame it could read without
//! waiting as one batch, so that the worker, a blocking thread, is woken once per batch instead of once per frame:
//! a delta by change list sends one small BLOCKS frame per changed chunk, thousands of them, and a wake-up costs
//! two thread switches.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::codec::Message;

/// Frames in one batch, at most.
pub const BATCH: usize = 16;

/// The pump's end: batches of at most [`BATCH`] frames.
pub type Sender = mpsc::Sender<Vec<Message>>;

/// The worker's end: frames one at a time, in order.
pub struct Inbox {
    rx: mpsc::Receiver<Vec<Message>>,
    ready: VecDeque<Message>,
}

/// An inbox that holds at most `messages` frames waiting (rounded up to whole batches).
pub fn channel(messages: usize) -> (Sender, Inbox) {
    let (tx, rx) = mpsc::channel(messages.div_ceil(BATCH).max(1));
    let inbox = Inbox {
        rx,
        ready: VecDeque::with_capacity(BATCH),
    };
    (tx, inbox)
}

impl Inbox {
    /// The next frame, waiting for one; `None` once the pump is gone and every frame was taken.
    pub fn blocking_recv(&mut self) -> Option<Message> {
        while self.ready.is_empty() {
            self.ready.extend(self.rx.blocking_recv()?);
        }
        self.ready.pop_front()
    }

    /// The next frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        while self.ready.is_empty() {
            self.ready.extend(self.rx.try_recv().ok()?);
        }
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(through: u64) -> Message {
        Message::Ack { through }
    }

    fn through(m: Option<Message>) -> Option<u64> {
        match m {
            Some(Message::Ack { through }) => Some(through),
            _ => None,
        }
    }

    #[test]
    fn frames_come_out_in_order_across_batches_and_end_with_the_pump() {
        let (tx, mut inbox) = channel(64);
        tx.try_send(vec![ack(1), ack(2)]).expect("room");
        tx.try_send(vec![]).expect("room");
        tx.try_send(vec![ack(3)]).expect("room");
        assert_eq!(through(inbox.try_recv()), Some(1));
        assert_eq!(through(inbox.blocking_recv()), Some(2));
        // An empty batch is passed over.
        assert_eq!(through(inbox.try_recv()), Some(3));
        assert_eq!(through(inbox.try_recv()), None, "nothing waiting");
        drop(tx);
        assert!(inbox.blocking_recv().is_none(), "the pump is gone");
    }

    #[test]
    fn the_inbox_holds_about_as_many_frames_as_asked() {
        let (tx, _inbox) = channel(64);
        assert_eq!(tx.max_capacity() * BATCH, 64);
        let (tx, _inbox) = channel(1);
        assert_eq!(tx.max_capacity(), 1);
    }
}
