//! Ogg page integrity, checked over the bytes a decode read. symphonia's Ogg reader skips a
//! page whose checksum fails (it only logs) and takes a file that ends inside a page for the
//! stream's end; Ogg headers carry no length, so neither shows anywhere else: a damaged or
//! cut-short Ogg file would decode to shorter audio without a word. Each page is checked
//! here: its signature where the previous page ended, its CRC-32, its sequence number
//! (pages missing in between), and, when the decode read to the end, that the file ends
//! with a whole page. A stream without its end-of-stream page is only a warning: real files
//! (two of tuxpaint-stamps' recordings) end on a whole page with no such flag and hold all
//! their audio (the last page's granule position equals the decoded length).

use std::collections::HashMap;
use std::io::Read;

use symphonia::core::checksum::Crc32;
use symphonia::core::io::Monitor;

/// Header bytes before the segment table.
const HEADER: usize = 27;
/// Flag bit of a stream's last page.
const END_OF_STREAM: u8 = 0x04;

/// Checks the pages of the Ogg stream `source` (read from its first byte): those that start
/// before `upto`, or, with `None`, all of them and a clean end. The error is the reason,
/// naming the page and its byte offset; `Ok(Some(warning))` for a stream that ends on a
/// whole page without its end-of-stream flag.
pub fn check_pages(source: &mut impl Read, upto: Option<u64>) -> Result<Option<String>, String> {
    // serial -> (sequence number of its last page, whether that page ended the stream).
    let mut streams: HashMap<u32, (u32, bool)> = HashMap::new();
    let mut at: u64 = 0;
    let mut index = 0usize;
    let mut body = Vec::new();
    loop {
        if upto.is_some_and(|end| at >= end) {
            return Ok(None);
        }
        let mut header = [0u8; HEADER + 255];
        let n = read_up_to(source, &mut header[..HEADER])
            .map_err(|e| format!("cannot read Ogg page {index} at byte {at}: {e}"))?;
        if n == 0 {
            break;
        }
        let cut = |what: &str| {
            format!(
                "truncated: the file ends inside the {what} of Ogg page {index} (byte {at}); \
                 the rest of the audio is missing"
            )
        };
        if n < HEADER {
            return Err(cut("header"));
        }
        if &header[..4] != b"OggS" {
            return Err(format!(
                "no Ogg page where page {index} should start (byte {at}): the file is damaged \
                 there"
            ));
        }
        if header[4] != 0 {
            return Err(format!(
                "Ogg page {index} (byte {at}) has version {}, not 0: the file is damaged there",
                header[4]
            ));
        }
        let flags = header[5];
        let serial = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes"));
        let sequence = u32::from_le_bytes(header[18..22].try_into().expect("4 bytes"));
        let stored_crc = u32::from_le_bytes(header[22..26].try_into().expect("4 bytes"));
        let segments = header[26] as usize;
        let table = HEADER..HEADER + segments;
        if read_up_to(source, &mut header[table.clone()])
            .map_err(|e| format!("cannot read Ogg page {index} at byte {at}: {e}"))?
            < segments
        {
            return Err(cut("segment table"));
        }
        let body_len: usize = header[table].iter().map(|&s| s as usize).sum();
        body.resize(body_len, 0);
        if read_up_to(source, &mut body)
            .map_err(|e| format!("cannot read Ogg page {index} at byte {at}: {e}"))?
            < body_len
        {
            return Err(cut("data"));
        }
        // The checksum covers the page with its own field read as zero.
        header[22..26].fill(0);
        let mut crc = Crc32::new(0);
        crc.process_buf_bytes(&header[..HEADER + segments]);
        crc.process_buf_bytes(&body);
        if crc.crc() != stored_crc {
            return Err(format!(
                "Ogg page {index} (byte {at}) fails its checksum: its audio is damaged and \
                 would be skipped"
            ));
        }
        match streams.get(&serial) {
            Some(&(_, true)) => {
                return Err(format!(
                    "Ogg page {index} (byte {at}) follows the end-of-stream page of its stream \
                     ({serial:#x})"
                ))
            }
            Some(&(last, false)) if sequence != last.wrapping_add(1) => {
                return Err(format!(
                    "Ogg page {index} (byte {at}) has sequence number {sequence} after {last}: \
                     {} page(s) of stream {serial:#x} are missing",
                    sequence.wrapping_sub(last).wrapping_sub(1)
                ))
            }
            _ => {}
        }
        streams.insert(serial, (sequence, flags & END_OF_STREAM != 0));
        at += (HEADER + segments + body_len) as u64;
        index += 1;
    }
    Ok(streams
        .iter()
        .find(|(_, &(_, ended))| !ended)
        .map(|(serial, _)| {
            format!(
                "Ogg stream {serial:#x} has no end-of-stream page (the file ends after page {}, \
                 byte {at}): if the file was cut short there, audio is missing",
                index.saturating_sub(1)
            )
        }))
}

fn read_up_to(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One page of `serial` with `body`, its CRC computed as libogg does.
    fn page(serial: u32, sequence: u32, flags: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 255 * 255);
        let mut segments = vec![255u8; body.len() / 255];
        segments.push((body.len() % 255) as u8);
        let mut p = b"OggS".to_vec();
        p.push(0);
        p.push(flags);
        p.extend(7u64.to_le_bytes());
        p.extend(serial.to_le_bytes());
        p.extend(sequence.to_le_bytes());
        p.extend([0; 4]);
        p.push(segments.len() as u8);
        p.extend(&segments);
        p.extend(body);
        let mut crc = Crc32::new(0);
        crc.process_buf_bytes(&p);
        p[22..26].copy_from_slice(&crc.crc().to_le_bytes());
        p
    }

    fn stream(pages: &[(u32, u8, &[u8])]) -> Vec<u8> {
        pages
            .iter()
            .map(|&(seq, flags, body)| page(0xabc, seq, flags, body))
            .collect::<Vec<_>>()
            .concat()
    }

    fn check(bytes: &[u8], upto: Option<u64>) -> Result<Option<String>, String> {
        check_pages(&mut std::io::Cursor::new(bytes), upto)
    }

    #[test]
    fn a_whole_stream_passes_and_each_kind_of_damage_is_named() {
        let body = vec![5u8; 600];
        let good = stream(&[
            (0, 0x02, b"head"),
            (1, 0, &body),
            (2, END_OF_STREAM, b"end"),
        ]);
        assert_eq!(check(&good, None), Ok(None));

        // Cut inside the last page: an error; cut exactly after a whole page: a warning.
        let e = check(&good[..good.len() - 2], None).unwrap_err();
        assert!(e.contains("truncated") && e.contains("page 2"), "{e}");
        let two_pages = stream(&[(0, 0x02, b"head"), (1, 0, &body)]);
        let w = check(&two_pages, None).unwrap().expect("a warning");
        assert!(w.contains("no end-of-stream page"), "{w}");

        // One byte of audio changed: the checksum fails on that page.
        let mut flipped = good.clone();
        let in_body = page(0xabc, 0, 0x02, b"head").len() + 100;
        flipped[in_body] ^= 0x10;
        let e = check(&flipped, None).unwrap_err();
        assert!(e.contains("page 1") && e.contains("checksum"), "{e}");

        // A page missing in the middle.
        let gap = stream(&[(0, 0x02, b"head"), (2, END_OF_STREAM, b"end")]);
        let e = check(&gap, None).unwrap_err();
        assert!(e.contains("1 page(s)") && e.contains("missing"), "{e}");

        // Bytes between pages.
        let mut junk = page(0xabc, 0, 0x02, b"head");
        junk.extend(b"junk");
        junk.extend(page(0xabc, 1, END_OF_STREAM, b"end"));
        let e = check(&junk, None).unwrap_err();
        assert!(e.contains("no Ogg page where page 1 should start"), "{e}");
    }

    #[test]
    fn only_the_pages_before_the_limit_are_checked() {
        let body = vec![5u8; 300];
        let mut bytes = stream(&[(0, 0x02, b"head"), (1, 0, &body), (2, END_OF_STREAM, &body)]);
        let first_two = page(0xabc, 0, 0x02, b"head").len() + page(0xabc, 1, 0, &body).len();
        // Damage in the third page: outside the part a segment decode read.
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        assert_eq!(check(&bytes, Some(first_two as u64)), Ok(None));
        assert!(check(&bytes, None).unwrap_err().contains("page 2"));
        // The file cut inside the second page is found even with a limit.
        let e = check(&bytes[..first_two - 5], Some(first_two as u64)).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
