//! The ranges of a SnapshotMetadata stream, checked before anything is believed.
//!
//! What the service says is trusted only in the sense that a range it omits is not read: everything that can be
//! checked is, and a stream that breaks a rule of the API (ranges not strictly increasing, past the volume, of a
//! size that is not positive, a FIXED_LENGTH stream whose sizes vary, a capacity that is not the volume's size, a
//! message longer than `max_results`) is refused as a whole, never used in part.

/// `BlockMetadataType::FIXED_LENGTH` on the wire.
pub const FIXED_LENGTH: i32 = 1;
/// `BlockMetadataType::VARIABLE_LENGTH` on the wire.
pub const VARIABLE_LENGTH: i32 = 2;

/// The most extents kept after merging adjacent ones (16 bytes each: 64 MiB). A list longer than that is refused
/// (the sync is then a full comparison, which reads everything anyway).
pub const MAX_EXTENTS: usize = 4 << 20;

/// One response message, whatever the call.
pub struct Message<'a> {
    /// `block_metadata_type`.
    pub kind: i32,
    /// `volume_capacity_bytes`.
    pub capacity: i64,
    /// `block_metadata`: `(byte_offset, size_bytes)`.
    pub ranges: &'a [(i64, i64)],
}

/// Collects the ranges of one call (over all its resumed streams), refusing any that break the rules.
#[derive(Debug)]
pub struct Collector {
    volume_size: u64,
    max_results: usize,
    kind: Option<i32>,
    fixed_size: Option<u64>,
    /// The end of the last range received: where a resumed stream starts.
    end: u64,
    /// Sorted, disjoint, merged when adjacent.
    extents: Vec<(u64, u64)>,
    ranges: u64,
}

impl Collector {
    /// For a volume of `volume_size` bytes, with `max_results` asked per message (0: any number).
    pub fn new(volume_size: u64, max_results: u32) -> Self {
        Collector {
            volume_size,
            max_results: if max_results == 0 {
                usize::MAX
            } else {
                max_results as usize
            },
            kind: None,
            fixed_size: None,
            end: 0,
            extents: Vec::new(),
            ranges: 0,
        }
    }

    /// The `starting_offset` of a resumed stream: the end of the last range received.
    pub fn resume_offset(&self) -> u64 {
        self.end
    }

    /// Ranges received so far (before merging).
    pub fn ranges(&self) -> u64 {
        self.ranges
    }

    /// Takes one message; an error says which rule it broke.
    pub fn push(&mut self, m: &Message) -> Result<(), String> {
        match (m.kind, self.kind) {
            (FIXED_LENGTH | VARIABLE_LENGTH, None) => self.kind = Some(m.kind),
            (k, Some(prev)) if k == prev => {}
            (k, Some(prev)) => {
                return Err(format!(
                    "block_metadata_type changed from {} to {} within one answer",
                    kind_name(prev),
                    kind_name(k)
                ))
            }
            (k, None) => {
                return Err(format!(
                    "block_metadata_type {} is not usable",
                    kind_name(k)
                ))
            }
        }
        if u64::try_from(m.capacity).ok() != Some(self.volume_size) {
            return Err(format!(
                "the snapshot's capacity ({} bytes) is not the volume's size ({} bytes)",
                m.capacity, self.volume_size
            ));
        }
        if m.ranges.len() > self.max_results {
            return Err(format!(
                "a message holds {} ranges, more than the {} asked for (max_results)",
                m.ranges.len(),
                self.max_results
            ));
        }
        for &(offset, size) in m.ranges {
            self.range(offset, size)?;
        }
        Ok(())
    }

    fn range(&mut self, offset: i64, size: i64) -> Result<(), String> {
        let (Ok(o), Ok(s)) = (u64::try_from(offset), u64::try_from(size)) else {
            return Err(format!("range [{offset}, {size}] is negative"));
        };
        if s == 0 {
            return Err(format!("range [{offset}, {size}] is empty"));
        }
        let end = o.checked_add(s).filter(|e| *e <= self.volume_size);
        let Some(end) = end else {
            return Err(format!(
                "range [{offset}, {size}] ends past the end of the volume ({} bytes)",
                self.volume_size
            ));
        };
        if o < self.end {
            return Err(format!(
                "range [{offset}, {size}] is not after the previous one (which ended at byte {}): ranges must be \
                 strictly increasing",
                self.end
            ));
        }
        if self.kind == Some(FIXED_LENGTH) {
            match self.fixed_size {
                None => self.fixed_size = Some(s),
                Some(f) if f == s => {}
                Some(f) => {
                    return Err(format!(
                    "range [{offset}, {size}] of a FIXED_LENGTH answer whose ranges are {f} bytes"
                ))
                }
            }
        }
        self.ranges += 1;
        self.end = end;
        match self.extents.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += s,
            _ => {
                if self.extents.len() >= MAX_EXTENTS {
                    return Err(format!("more than {MAX_EXTENTS} separate ranges"));
                }
                self.extents.push((o, s));
            }
        }
        Ok(())
    }

    /// The extents `(offset, length)` received: sorted, disjoint, adjacent ones merged.
    pub fn finish(self) -> Vec<(u64, u64)> {
        self.extents
    }
}

fn kind_name(kind: i32) -> String {
    match kind {
        0 => "UNKNOWN".to_owned(),
        FIXED_LENGTH => "FIXED_LENGTH".to_owned(),
        VARIABLE_LENGTH => "VARIABLE_LENGTH".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: i32, capacity: i64, ranges: &[(i64, i64)]) -> Message<'_> {
        Message {
            kind,
            capacity,
            ranges,
        }
    }

    #[test]
    fn fixed_and_variable_ranges_are_merged_when_adjacent() -> Result<(), String> {
        let mut c = Collector::new(1 << 20, 3);
        c.push(&msg(FIXED_LENGTH, 1 << 20, &[(0, 4096), (4096, 4096)]))?;
        c.push(&msg(FIXED_LENGTH, 1 << 20, &[]))?;
        c.push(&msg(FIXED_LENGTH, 1 << 20, &[(65536, 4096)]))?;
        assert_eq!(c.resume_offset(), 65536 + 4096);
        assert_eq!(c.ranges(), 3);
        assert_eq!(c.finish(), vec![(0, 8192), (65536, 4096)]);

        let mut c = Collector::new(1 << 20, 0);
        c.push(&msg(
            VARIABLE_LENGTH,
            1 << 20,
            &[(10, 5), (15, 100), (1000, 1 << 19)],
        ))?;
        assert_eq!(c.finish(), vec![(10, 105), (1000, 1 << 19)]);
        Ok(())
    }

    #[test]
    fn every_broken_rule_is_refused() {
        const SIZE: i64 = 1 << 20;
        type Case = (Vec<(i32, i64, Vec<(i64, i64)>)>, &'static str);
        let (f, v) = (FIXED_LENGTH, VARIABLE_LENGTH);
        let cases: Vec<Case> = vec![
            (vec![(0, SIZE, vec![])], "UNKNOWN is not usable"),
            (vec![(7, SIZE, vec![])], "7 is not usable"),
            (
                vec![(f, SIZE, vec![]), (v, SIZE, vec![])],
                "changed from FIXED_LENGTH to VARIABLE_LENGTH",
            ),
            (
                vec![(f, SIZE * 2, vec![])],
                "capacity (2097152 bytes) is not the volume's size",
            ),
            (
                vec![(f, SIZE, vec![(SIZE - 4096, 8192)])],
                "ends past the end of the volume",
            ),
            (vec![(v, SIZE, vec![(i64::MAX, 2)])], "ends past the end"),
            (vec![(v, SIZE, vec![(-1, 2)])], "is negative"),
            (vec![(v, SIZE, vec![(0, 0)])], "is empty"),
            (
                vec![(v, SIZE, vec![(8192, 10)]), (v, SIZE, vec![(4096, 10)])],
                "strictly increasing",
            ),
            (
                vec![(v, SIZE, vec![(0, 10), (5, 10)])],
                "strictly increasing",
            ),
            (
                vec![(v, SIZE, vec![(0, 10), (0, 10)])],
                "strictly increasing",
            ),
            (
                vec![(f, SIZE, vec![(0, 4096), (8192, 8192)])],
                "FIXED_LENGTH answer whose ranges",
            ),
            (
                vec![(f, SIZE, vec![(0, 1), (1, 1), (2, 1), (3, 1)])],
                "more than the 3 asked",
            ),
        ];
        for (messages, why) in cases {
            let mut c = Collector::new(SIZE as u64, 3);
            let err = messages
                .iter()
                .try_for_each(|(k, cap, r)| c.push(&msg(*k, *cap, r)))
                .expect_err(why);
            assert!(err.contains(why), "{err:?} does not say {why:?}");
        }
    }
}
