//! A validated manifest, read page by page: each page of digests is checked against its value in the page table
//! when it is first read, so that a delta reads the pages it touches, not the whole manifest.

use std::io;

use super::entries::Entries;
use super::format::{BaseFile, Changes, DIGEST_LEN};
use super::Header;
use crate::chunk::pages::Pages;
use crate::chunk::Digest;

/// Pages kept verified in memory: the access is mostly in chunk order, and a digest may lie in two pages.
const CACHED_PAGES: usize = 2;

/// A validated manifest: its header, and its digests read at random or streamed in chunk order.
///
/// Reads the files it validated through the same descriptors (a manifest committed meanwhile replaces a file by
/// rename and does not disturb it). A page whose digests do not give its value (the file changed in place or
/// went bad on disk after validation) is an [`io::ErrorKind::InvalidData`] error, never a digest.
pub struct Reader {
    pub(super) file: BaseFile,
    /// The manifest's header: the changes file's, if there is one, else the base file's.
    header: Header,
    pub(super) pages: Pages,
    /// The value of each page of the image the manifest describes.
    pub(super) table: Vec<[u8; 32]>,
    /// The digests that differ from the base file, in chunk order.
    pub(super) changes: Entries,
    /// Verified pages: the index and the digests of its chunks ([`Pages::chunks`]).
    cache: Vec<(u64, Vec<u8>)>,
    /// The stream's next chunk.
    next: u64,
}

impl Reader {
    pub(super) fn new(file: BaseFile, changes: Option<Changes>) -> Self {
        let pages = Pages::new(file.header.geometry);
        let (header, table, changes) = match changes {
            Some(c) => (c.header, c.table, c.entries),
            None => (file.header.clone(), file.table.clone(), Entries::default()),
        };
        Reader {
            file,
            header,
            pages,
            table,
            changes,
            cache: Vec::with_capacity(CACHED_PAGES),
            next: 0,
        }
    }

    /// A second reader of the same validated manifest, from its first chunk, with its own page cache (for a
    /// thread that looks digests up while this one streams them).
    pub fn try_clone(&self) -> io::Result<Reader> {
        Ok(Reader {
            file: self.file.try_clone()?,
            header: self.header.clone(),
            pages: self.pages,
            table: self.table.clone(),
            changes: self.changes.clone(),
            cache: Vec::with_capacity(CACHED_PAGES),
            next: 0,
        })
    }

    /// The manifest's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How many digests the manifest holds (the geometry's chunk count).
    pub fn chunk_count(&self) -> u64 {
        self.header.geometry.chunk_count()
    }

    /// The page layout of its digests.
    pub fn pages(&self) -> Pages {
        self.pages
    }

    /// How many digests differ from the base file (those in its changes file).
    pub fn changed(&self) -> u64 {
        self.changes.len() as u64
    }

    /// Reads and checks every page: what a caller that streams the whole manifest anyway does first, so that a
    /// damaged manifest means a full comparison rather than a failure halfway through a session.
    pub fn verify_all(&mut self) -> io::Result<()> {
        (0..self.pages.count()).try_for_each(|p| self.page(p).map(|_| ()))
    }

    /// The digests of [`Pages::chunks`]`(p)`, checked against page `p`'s value.
    pub(super) fn page(&mut self, p: u64) -> io::Result<&[u8]> {
        if let Some(i) = self.cache.iter().position(|(q, _)| *q == p) {
            return Ok(&self.cache[i].1);
        }
        let chunks = self.pages.chunks(p);
        let mut digests = if self.cache.len() < CACHED_PAGES {
            Vec::new()
        } else {
            // The oldest entry goes (the access moves forward).
            self.cache.remove(0).1
        };
        digests.resize(((chunks.end - chunks.start) * DIGEST_LEN) as usize, 0);
        self.file
            .src
            .read_at(
                &mut digests,
                self.file.digests_at + chunks.start * DIGEST_LEN,
            )
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => bad(p, "the file shrank"),
                _ => e,
            })?;
        let mut scratch = Vec::new();
        if self
            .pages
            .value(p, self.pages.input(p, &digests, &mut scratch))
            != self.file.table[p as usize]
        {
            return Err(bad(
                p,
                "its digests do not give its value in the page table",
            ));
        }
        let first = self.changes.partition_point(chunks.start);
        let mut applied = false;
        for (chunk, d) in self
            .changes
            .iter_from(first)
            .take_while(|(c, _)| *c < chunks.end)
        {
            let at = ((chunk - chunks.start) * DIGEST_LEN) as usize;
            digests[at..at + DIGEST_LEN as usize].copy_from_slice(&d.0);
            applied = true;
        }
        if applied
            && self
                .pages
                .value(p, self.pages.input(p, &digests, &mut scratch))
                != self.table[p as usize]
        {
            return Err(bad(
                p,
                "with its changes applied it does not give its value in the changes file",
            ));
        }
        self.cache.push((p, digests));
        Ok(&self.cache.last().expect("just pushed").1)
    }

    /// The digest of chunk `chunk`, checked (with both pages, if it lies in two).
    pub fn digest(&mut self, chunk: u64) -> io::Result<Digest> {
        if chunk >= self.chunk_count() {
            return Err(past_the_end(self.chunk_count()));
        }
        let pages = self.pages.of_chunk(chunk);
        if pages.end - pages.start == 2 {
            self.page(pages.start + 1)?;
        }
        let first = self.pages.chunks(pages.start).start;
        let page = self.page(pages.start)?;
        let at = ((chunk - first) * DIGEST_LEN) as usize;
        Ok(Digest(page[at..at + 32].try_into().expect("32 bytes")))
    }

    /// The digests of chunks `first ..` into `out` (a multiple of 32 bytes), checked, in bulk.
    pub fn digests(&mut self, first: u64, out: &mut [u8]) -> io::Result<()> {
        debug_assert_eq!(out.len() % DIGEST_LEN as usize, 0);
        let n = out.len() as u64 / DIGEST_LEN;
        if first
            .checked_add(n)
            .is_none_or(|end| end > self.chunk_count())
        {
            return Err(past_the_end(self.chunk_count()));
        }
        let mut c = first;
        let mut at = 0usize;
        while c < first + n {
            let p = self.pages.of_chunk(c).start;
            let chunks = self.pages.chunks(p);
            // The last digest of a page but the last lies in the next page too.
            let whole_end = if p + 1 < self.pages.count() {
                chunks.end - 1
            } else {
                chunks.end
            };
            if c < whole_end {
                let take = (whole_end - c).min(first + n - c);
                let from = ((c - chunks.start) * DIGEST_LEN) as usize;
                let len = (take * DIGEST_LEN) as usize;
                let page = self.page(p)?;
                out[at..at + len].copy_from_slice(&page[from..from + len]);
                c += take;
                at += len;
            } else {
                let d = self.digest(c)?;
                out[at..at + 32].copy_from_slice(&d.0);
                c += 1;
                at += 32;
            }
        }
        Ok(())
    }

    /// Starts the stream of digests again from chunk 0.
    pub fn rewind(&mut self) -> io::Result<()> {
        self.next = 0;
        Ok(())
    }

    /// The digest of the stream's next chunk (the first call gives chunk 0). An error past the last chunk
    /// ([`io::ErrorKind::InvalidInput`]) or for a page that does not hold what the table says
    /// ([`io::ErrorKind::InvalidData`]).
    pub fn next_digest(&mut self) -> io::Result<Digest> {
        let d = self.digest(self.next)?;
        self.next += 1;
        Ok(d)
    }

    /// The digests of the stream's next `buf.len() / 32` chunks, concatenated into `buf`: what
    /// [`Reader::next_digest`] gives that many times, with the same checks, in bulk.
    pub fn next_digests(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.digests(self.next, buf)?;
        self.next += buf.len() as u64 / DIGEST_LEN;
        Ok(())
    }

    /// Moves the stream to chunk `chunk` without reading what lies before it.
    pub fn seek(&mut self, chunk: u64) {
        self.next = chunk;
    }

    /// The stream's next chunk.
    pub fn position(&self) -> u64 {
        self.next
    }
}

fn bad(page: u64, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("page {page} of the manifest: {why} (the file changed or went bad after it was validated)"),
    )
}

fn past_the_end(count: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("read past the last of the manifest's {count} digests"),
    )
}
