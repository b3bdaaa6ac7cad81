//! WAV files written to a pipe. A writer that cannot seek back (`ffmpeg ... -f wav -`,
//! `arecord`, `sox ... -t wav -`) leaves the RIFF and data sizes at a placeholder, 0xFFFFFFFF
//! or 0, meaning "until the end of the file"; ffmpeg and libsndfile read such files so.
//! symphonia takes the placeholder literally (a data chunk of 4 GiB, so a "truncated" file,
//! or of 0 bytes, so no data chunk), so earshot reads these files through a copy of their
//! header with the sizes the file actually has. A data size that is real but larger than
//! the file is left alone: that file is truncated, and decoding says so.

use std::io::{Read, Seek, SeekFrom};

use symphonia::core::io::MediaSource;

/// Size values that writers leave when they cannot go back and fill them in.
fn is_placeholder(size: u32) -> bool {
    size == 0 || size == u32::MAX
}

/// The first bytes of a WAV file up to its data chunk's header, with a placeholder data size
/// (and RIFF size) replaced by what the file of `file_len` bytes holds; `None` when there is
/// nothing to replace (not WAV, sizes already given, the data chunk header not in `head`).
pub fn streamed_header(head: &[u8], file_len: u64) -> Option<Vec<u8>> {
    if head.len() < 12 || &head[..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return None;
    }
    let mut block_align = 1u64;
    let mut at = 12usize;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = u32::from_le_bytes(head[at + 4..at + 8].try_into().expect("4 bytes"));
        if id == b"fmt " {
            if let Some(b) = head.get(at + 20..at + 22) {
                block_align = u64::from(u16::from_le_bytes([b[0], b[1]])).max(1);
            }
        }
        if id == b"data" {
            if !is_placeholder(size) {
                return None;
            }
            let start = (at + 8) as u64;
            let bytes = file_len.checked_sub(start)?;
            let bytes = bytes - bytes % block_align;
            let data_size = u32::try_from(bytes).ok()?;
            let riff_size = u32::try_from(file_len - 8).unwrap_or(u32::MAX);
            let mut patched = head[..at + 8].to_vec();
            patched[4..8].copy_from_slice(&riff_size.to_le_bytes());
            patched[at + 4..at + 8].copy_from_slice(&data_size.to_le_bytes());
            return Some(patched);
        }
        at = at
            .checked_add(8)?
            .checked_add(size as usize + (size as usize & 1))?;
    }
    None
}

/// A media source read through a replacement of its first bytes (same length).
pub struct PatchedHead {
    head: Vec<u8>,
    inner: Box<dyn MediaSource>,
    pos: u64,
}

impl PatchedHead {
    pub fn new(inner: Box<dyn MediaSource>, head: Vec<u8>) -> Self {
        Self {
            head,
            inner,
            pos: 0,
        }
    }
}

impl Read for PatchedHead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let head_len = self.head.len() as u64;
        if self.pos < head_len {
            let from = self.pos as usize;
            let n = buf.len().min(self.head.len() - from);
            buf[..n].copy_from_slice(&self.head[from..from + n]);
            self.pos += n as u64;
            if self.pos == head_len {
                self.inner.seek(SeekFrom::Start(head_len))?;
            }
            return Ok(n);
        }
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PatchedHead {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self
                .inner
                .byte_len()
                .and_then(|len| len.checked_add_signed(d)),
        }
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.inner
            .seek(SeekFrom::Start(target.max(self.head.len() as u64)))?;
        self.pos = target;
        Ok(target)
    }
}

impl MediaSource for PatchedHead {
    fn is_seekable(&self) -> bool {
        self.inner.is_seekable()
    }

    fn byte_len(&self) -> Option<u64> {
        self.inner.byte_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(riff: u32, data: u32, pcm: &[u8], block_align: u16) -> Vec<u8> {
        let mut w = b"RIFF".to_vec();
        w.extend(riff.to_le_bytes());
        w.extend(b"WAVEfmt ");
        w.extend(16u32.to_le_bytes());
        w.extend(1u16.to_le_bytes());
        w.extend(1u16.to_le_bytes());
        w.extend(16_000u32.to_le_bytes());
        w.extend((16_000 * u32::from(block_align)).to_le_bytes());
        w.extend(block_align.to_le_bytes());
        w.extend(16u16.to_le_bytes());
        w.extend(b"data");
        w.extend(data.to_le_bytes());
        w.extend(pcm);
        w
    }

    #[test]
    fn placeholders_get_the_file_s_sizes_and_real_sizes_are_left_alone() {
        let pcm = vec![1u8; 101]; // an odd byte at the end: not a whole 2-byte frame
        for placeholder in [0, u32::MAX] {
            let file = wav(placeholder, placeholder, &pcm, 2);
            let head = streamed_header(&file, file.len() as u64).expect("patched");
            assert_eq!(head.len(), 44);
            assert_eq!(&head[4..8], &(file.len() as u32 - 8).to_le_bytes());
            assert_eq!(&head[40..44], &100u32.to_le_bytes());
            assert_eq!(&head[8..40], &file[8..40]);
        }
        // A real size, even one the file cannot hold (truncated), is not touched.
        let file = wav(36 + 1000, 1000, &pcm, 2);
        assert_eq!(streamed_header(&file, file.len() as u64), None);
        assert_eq!(streamed_header(b"OggS....", 8), None);
    }

    #[test]
    fn the_patched_source_reads_and_seeks_as_the_file_with_its_new_head() {
        let file: Vec<u8> = (0..=255u8).collect();
        let head = vec![9u8; 10];
        let mut want = file.clone();
        want[..10].copy_from_slice(&head);
        let mut src = PatchedHead::new(Box::new(std::io::Cursor::new(file)), head);
        let mut got = Vec::new();
        src.read_to_end(&mut got).unwrap();
        assert_eq!(got, want);
        for (to, at) in [
            (SeekFrom::Start(4), 4usize),
            (SeekFrom::End(-3), 253),
            (SeekFrom::Start(12), 12),
        ] {
            src.seek(to).unwrap();
            let mut b = [0u8; 8];
            let n = src.read(&mut b).unwrap();
            assert_eq!(&b[..n], &want[at..at + n], "after {to:?}");
        }
        assert!(src.seek(SeekFrom::Current(-100)).is_err());
    }
}
