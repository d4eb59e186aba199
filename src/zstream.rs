//! zstd streams that keep their context from one DATA payload to the next (protocol version 4, "Compression
//! lanes" in `proto/PROTOCOL.md`).
//!
//! A payload compressed alone starts from an empty window: the 4 KiB text block of a scattered write has nothing to
//! match against but itself. A lane is one zstd frame that lasts the session: each payload is the next part of it,
//! flushed at the payload's end (`ZSTD_e_flush`), so the destination decodes it as soon as it arrives, and later
//! payloads match against the earlier ones within the window. The source runs one lane per compressing thread; the
//! destination decodes each lane's payloads in the order they arrive (one TLS stream keeps that order).
//!
//! Memory is bounded on both sides by [`WINDOW_LOG`] per lane and by [`MAX_LANES`]; the decoder refuses a frame
//! that asks for a larger window, and a payload that decodes to more or fewer bytes than its `raw_len`.

use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// The most lanes a session may use (DATA encodings `2..2 + MAX_LANES`).
pub const MAX_LANES: usize = 4;
/// log2 of a lane's window: 8 MiB, what a lane's decoder holds of the data before the payload it decodes.
pub const WINDOW_LOG: u32 = 23;
/// How much larger than its raw data a lane payload may be: zstd falls back to raw blocks (3 bytes of header per
/// 128 KiB block) for data it cannot compress, and the first payload of a lane carries the frame header.
pub const MAX_EXPANSION: usize = 64;

fn zstd_error(what: &str, code: usize) -> std::io::Error {
    std::io::Error::other(format!("{what}: {}", zstd_safe::get_error_name(code)))
}

/// The source's end of a lane.
pub struct Encoder {
    ctx: CCtx<'static>,
    level: i32,
    /// A frame is open (a part was compressed since the last frame ended).
    open: bool,
    /// The level changed: the open frame ends with the next part, and a new frame at the level begins in it.
    restart: bool,
}

impl Encoder {
    /// A lane compressing at `level`.
    pub fn new(level: i32) -> std::io::Result<Self> {
        let mut ctx = CCtx::try_create().ok_or_else(|| std::io::Error::other("zstd: no memory"))?;
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::WindowLog(WINDOW_LOG),
            CParameter::ChecksumFlag(false),
        ] {
            ctx.set_parameter(p)
                .map_err(|c| zstd_error("zstd parameter", c))?;
        }
        Ok(Encoder {
            ctx,
            level,
            open: false,
            restart: false,
        })
    }

    /// Changes the level for the payloads that follow. zstd takes a new level only at the start of a frame (a change
    /// within one is ignored in single-threaded mode, measured: 1 -> 6 mid-frame packed exactly as 1), so the next
    /// part ends the lane's frame and starts a new one at the new level; that part's window starts empty.
    pub fn set_level(&mut self, level: i32) -> std::io::Result<()> {
        if level != self.level {
            self.level = level;
            if self.open {
                self.restart = true;
            } else {
                self.ctx
                    .set_parameter(CParameter::CompressionLevel(level))
                    .map_err(|c| zstd_error("zstd level", c))?;
            }
        }
        Ok(())
    }

    /// The next part of the lane's stream: `raw`, compressed and flushed, decodable once the parts before it are.
    pub fn compress(&mut self, raw: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw.len()) + MAX_EXPANSION);
        if self.restart {
            self.run(&mut out, &[], ZSTD_EndDirective::ZSTD_e_end)?;
            self.ctx
                .set_parameter(CParameter::CompressionLevel(self.level))
                .map_err(|c| zstd_error("zstd level", c))?;
            self.restart = false;
        }
        self.run(&mut out, raw, ZSTD_EndDirective::ZSTD_e_flush)?;
        self.open = true;
        Ok(out)
    }

    /// Feeds `raw` and runs `end` until zstd has written all of it into `out`.
    fn run(
        &mut self,
        out: &mut Vec<u8>,
        raw: &[u8],
        end: ZSTD_EndDirective,
    ) -> std::io::Result<()> {
        let mut input = InBuffer::around(raw);
        loop {
            if out.capacity() == out.len() {
                out.reserve(4096);
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            let left = self
                .ctx
                .compress_stream2(&mut output, &mut input, end)
                .map_err(|c| zstd_error("zstd", c))?;
            if left == 0 && input.pos() == raw.len() {
                return Ok(());
            }
        }
    }
}

/// The destination's end of a lane.
pub struct Decoder {
    ctx: DCtx<'static>,
}

impl Decoder {
    /// A lane decoder that refuses windows above [`WINDOW_LOG`].
    pub fn new() -> std::io::Result<Self> {
        let mut ctx = DCtx::try_create().ok_or_else(|| std::io::Error::other("zstd: no memory"))?;
        ctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
            .map_err(|c| zstd_error("zstd parameter", c))?;
        Ok(Decoder { ctx })
    }

    /// Decodes the lane's next part, which must hold exactly `raw_len` bytes; the error says why not.
    pub fn decompress(&mut self, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
        if payload.len() > raw_len + MAX_EXPANSION {
            return Err(format!(
                "a lane payload of {} bytes for {raw_len} raw bytes",
                payload.len()
            ));
        }
        let mut out = Vec::with_capacity(raw_len);
        let mut input = InBuffer::around(payload);
        while input.pos() < payload.len() {
            let before = (input.pos(), out.len());
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            self.ctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|c| {
                    format!("the lane does not decode: {}", zstd_safe::get_error_name(c))
                })?;
            if (input.pos(), out.len()) == before {
                return Err(format!("the lane decodes to more than {raw_len} bytes"));
            }
        }
        // All input taken: anything the decoder still holds would be past raw_len.
        let mut probe = [0u8; 1];
        let mut output = OutBuffer::around(&mut probe[..]);
        let mut empty = InBuffer::around(&[]);
        self.ctx
            .decompress_stream(&mut output, &mut empty)
            .map_err(|c| format!("the lane does not decode: {}", zstd_safe::get_error_name(c)))?;
        if output.pos() != 0 || out.len() != raw_len {
            return Err(format!(
                "the lane payload decodes to {} bytes, expected {raw_len}",
                out.len() + output.pos()
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn text(seed: u64, len: usize) -> Vec<u8> {
        let words = [
            "volume", "block", "snapshot", "replica", "the", "of", "chunk", "write",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        while out.len() < len {
            out.extend_from_slice(words[rng.next_u32() as usize % words.len()].as_bytes());
            out.push(b' ');
        }
        out.truncate(len);
        out
    }

    #[test]
    fn payloads_decode_in_order_and_later_ones_are_smaller_for_the_context() -> anyhow::Result<()> {
        let (mut enc, mut dec) = (Encoder::new(1)?, Decoder::new()?);
        let blocks: Vec<Vec<u8>> = (0..32).map(|i| text(i, 4096)).collect();
        let mut sizes = Vec::new();
        for b in &blocks {
            let part = enc.compress(b)?;
            sizes.push(part.len());
            assert_eq!(
                dec.decompress(&part, b.len()).map_err(anyhow::Error::msg)?,
                *b
            );
        }
        let alone: usize = blocks
            .iter()
            .map(|b| zstd::bulk::compress(b, 1).map(|z| z.len()))
            .sum::<std::io::Result<usize>>()?;
        let lane: usize = sizes.iter().sum();
        assert!(lane * 10 < alone * 9, "lane {lane} bytes, alone {alone}");
        Ok(())
    }

    #[test]
    fn random_data_grows_by_at_most_the_bound_and_a_level_change_keeps_the_stream(
    ) -> anyhow::Result<()> {
        let (mut enc, mut dec) = (Encoder::new(3)?, Decoder::new()?);
        let mut raw = vec![0u8; 256 << 10];
        rand_chacha::ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut raw);
        let part = enc.compress(&raw)?;
        assert!(part.len() <= raw.len() + MAX_EXPANSION, "{}", part.len());
        assert_eq!(
            dec.decompress(&part, raw.len())
                .map_err(anyhow::Error::msg)?,
            raw
        );
        enc.set_level(9)?;
        let t = text(5, 65536);
        let part = enc.compress(&t)?;
        assert_eq!(
            dec.decompress(&part, t.len()).map_err(anyhow::Error::msg)?,
            t
        );
        let again = text(6, 65536);
        let part = enc.compress(&again)?;
        assert_eq!(
            dec.decompress(&part, again.len())
                .map_err(anyhow::Error::msg)?,
            again
        );
        Ok(())
    }

    #[test]
    fn a_new_level_takes_effect_at_the_next_part() -> anyhow::Result<()> {
        let prose = include_bytes!("../README.md");
        let chunks: Vec<&[u8]> = prose.chunks(16384).take(8).collect();
        let size = |switch: Option<i32>| -> anyhow::Result<usize> {
            let (mut enc, mut dec) = (Encoder::new(1)?, Decoder::new()?);
            let mut total = 0;
            for (i, c) in chunks.iter().enumerate() {
                if i == 1 {
                    if let Some(l) = switch {
                        enc.set_level(l)?;
                    }
                }
                let part = enc.compress(c)?;
                assert_eq!(
                    dec.decompress(&part, c.len()).map_err(anyhow::Error::msg)?,
                    *c
                );
                total += part.len();
            }
            Ok(total)
        };
        let (one, nineteen) = (size(None)?, size(Some(19))?);
        assert!(
            nineteen < one,
            "level 19 from the second part: {nineteen} bytes, level 1: {one}"
        );
        Ok(())
    }

    #[test]
    fn a_wrong_length_a_skipped_part_or_garbage_is_refused() -> anyhow::Result<()> {
        let mut enc = Encoder::new(1)?;
        let (a, b) = (text(1, 8192), text(2, 8192));
        let (pa, pb) = (enc.compress(&a)?, enc.compress(&b)?);
        let short = Decoder::new()?
            .decompress(&pa, a.len() - 1)
            .expect_err("longer");
        assert!(short.contains("8191"), "{short}");
        let long = Decoder::new()?
            .decompress(&pa, a.len() + 1)
            .expect_err("shorter");
        assert!(long.contains("expected"), "{long}");
        // The second part alone lacks the frame header.
        Decoder::new()?
            .decompress(&pb, b.len())
            .expect_err("skipped part");
        let mut bad = pa.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        let mut d = Decoder::new()?;
        if let Ok(out) = d.decompress(&bad, a.len()) {
            assert_ne!(out, a, "a flipped byte cannot decode to the same data");
        }
        let big = Decoder::new()?
            .decompress(&[0u8; 200], 100)
            .expect_err("bound");
        assert!(big.contains("lane payload of 200 bytes"), "{big}");
        Ok(())
    }

    #[test]
    fn a_frame_asking_for_a_larger_window_is_refused() -> anyhow::Result<()> {
        let mut ctx = CCtx::create();
        ctx.set_parameter(CParameter::WindowLog(WINDOW_LOG + 2))
            .map_err(|c| anyhow::anyhow!("{c}"))?;
        ctx.set_parameter(CParameter::CompressionLevel(1))
            .map_err(|c| anyhow::anyhow!("{c}"))?;
        // A declared content size lets the decoder see the window at once; a streamed frame declares the window.
        let raw = text(3, 1 << 20);
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
        let mut input = InBuffer::around(&raw);
        let mut output = OutBuffer::around(&mut out);
        ctx.compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_flush)
            .map_err(|c| anyhow::anyhow!("{c}"))?;
        let err = Decoder::new()?
            .decompress(&out, raw.len())
            .expect_err("window");
        assert!(err.contains("does not decode"), "{err}");
        Ok(())
    }
}
