//! Headers that symphonia reads wrongly, read with their size fields corrected
//! (`PatchedSource` overwrites those few bytes as they are read, and for a fmt chunk of a
//! size symphonia refuses reads its 16 fields followed by an empty cbSize; nothing is copied
//! and the audio bytes are never changed).
//!
//! - WAV files written to a pipe. A writer that cannot seek back (`ffmpeg ... -f wav -`,
//!   `arecord`, `sox ... -t wav -`) leaves the RIFF and data sizes at a placeholder,
//!   0xFFFFFFFF or 0, meaning "until the end of the file"; ffmpeg and libsndfile read such
//!   files so. symphonia takes the placeholder literally (a data chunk of 4 GiB, so a
//!   "truncated" file, or of 0 bytes, so no data chunk). A data size that is real but larger
//!   than the file is left alone: that file is truncated, and decoding says so.
//! - WAV whose RIFF size is a placeholder (0 or 0xFFFFFFFF) while its data size is real, or
//!   too small for the chunks it holds (a chunk that starts inside it ends past it): the
//!   chunks are what the file holds, and ffmpeg reads them so; symphonia 0.5 finds no data
//!   chunk or refuses the file ("chunk length exceeds parent"). The RIFF size is read as the
//!   file's length less 8. A RIFF size that only leaves bytes after the last chunk (a tag
//!   appended to the file) is left alone.
//! - WAV whose LIST chunk (INFO tags) is one byte short: its size stops before the pad of
//!   its last, odd subchunk. The pad is where an odd chunk's pad goes anyway; symphonia 0.5
//!   refuses the file ("chunk length exceeds parent"); the size is read with the pad.
//! - WAV in G.711 (A-law, mu-law) whose fmt chunk is 16 bytes, without the cbSize field that
//!   every non-PCM format has: symphonia 0.5 refuses the file ("malformed fmt_mulaw chunk");
//!   the stream is read with cbSize 0 inserted (fmt size 18, RIFF size + 2).
//! - WAV in PCM, IEEE float or G.711 whose fmt chunk has extra bytes after its 16 fields
//!   (cbSize and extension data these formats do not use, as some writers leave: a 20-byte
//!   PCM fmt chunk, an IEEE one of 18 bytes whose cbSize is not 0): symphonia 0.5 accepts
//!   only 16, 18 or 40 bytes (18 only, for G.711) and refuses the rest ("malformed fmt_pcm
//!   chunk"); ffmpeg and libsndfile skip the extension. The stream is read with the fields
//!   followed by cbSize 0 in place of the extra bytes (fmt size 18, the RIFF size changed by
//!   as much).
//! - WAVE_FORMAT_EXTENSIBLE whose sub-format GUID names PCM, IEEE float, A-law or mu-law and
//!   which symphonia 0.5 refuses while ffmpeg reads it (cbSize above 22, a channel mask with
//!   positions symphonia cannot map, the mu-law GUID, which symphonia expects as 0x0004), or
//!   whose valid bits exceed the sample width (ffmpeg decodes by the valid bits there and
//!   misreads the frames; the container width is the one the frames have): the stream is
//!   read as the plain format, its tag in place of 0xFFFE and its 16 fields followed by
//!   cbSize 0, like the chunks above.
//! - WAV in PCM, IEEE float or G.711 (plain or extensible) whose block alignment is 0, or
//!   whose bits per sample are no width symphonia decodes (12 bits in 16-bit samples; 0 or
//!   255 in an extensible chunk, whose GUID names the codec) while the other field gives
//!   the width: symphonia 0.5 fails ("block size is 0") or refuses the width; ffmpeg
//!   decodes by the field that is usable. The field is read as the other one gives it.
//! - WAV whose LIST chunk of INFO tags holds a tag that runs past the LIST's end: symphonia
//!   0.5 refuses the whole file; ffmpeg warns and stops reading the tags. The LIST's id is
//!   read as JUNK, which symphonia skips whole: the tags are lost, the audio is not.
//! - AIFF. The SSND chunk's size counts its 8-byte offset and block-size fields before the
//!   samples; symphonia 0.5 counts them as samples, so it promises 8 bytes of frames too many
//!   and reads 8 bytes past the chunk: a "truncated" file when SSND ends the file (Python's
//!   own AIFF test files), the next chunk's header decoded as audio when it does not.
//! - CAF whose data chunk size is -1. Apple's format allows it for a last data chunk whose
//!   length was unknown when it was written (a recording, `ffmpeg ... -f caf -`): the audio
//!   runs to the end of the file. symphonia 0.5 reads on past such a chunk, takes the first
//!   audio bytes for the next chunk's header and fails ("Invalid argument"); the size is
//!   read as the bytes the file holds.

use std::io::{Read, Seek, SeekFrom};

use symphonia::core::io::MediaSource;

/// Chunks walked before giving up on finding the one to correct (a hostile file may hold
/// millions of empty chunks).
const MAX_CHUNKS: usize = 4096;

/// Bytes to put in place of the file's at a byte offset (a size field), an offset in the
/// stream as read (after any [`Splice`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Bytes the stream as read holds at `at` in place of the file's `removed` bytes there (a
/// field a writer left out, when `removed` is 0, or extra bytes replaced by an empty field);
/// the file's bytes from `at + removed` on follow them.
#[derive(Debug, Clone, PartialEq)]
pub struct Splice {
    pub at: u64,
    pub removed: u64,
    pub bytes: Vec<u8>,
}

/// What to correct in a file's header, and a phrase for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Corrections {
    pub patches: Vec<Patch>,
    pub splice: Option<Splice>,
    /// What was corrected, for the log.
    pub what: String,
}

/// What a file's header says that symphonia 0.5 would get wrong.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    /// The fields to correct, read through a [`PatchedSource`]; `None`: nothing to correct.
    pub fix: Option<Corrections>,
    /// A WAV file's `fact` chunk frame count, if it has one. Block-coded WAV (IMA and
    /// Microsoft ADPCM) fills its last block with padding; `fact` says how many frames are
    /// real. symphonia 0.5 reads the chunk and then overwrites the count with the data
    /// chunk's whole blocks, so the padding is decoded as audio (up to one block: 63 ms at
    /// 8 kHz).
    pub fact_frames: Option<u64>,
}

/// Reads the header of a file (`head` its first bytes, `file_len` its length) for what
/// symphonia would misread. Walks the chunk headers once, with seeks (chunk bodies are not
/// read, but for the few fields it needs), and leaves the source at its start.
pub fn inspect<S: Read + Seek + ?Sized>(
    source: &mut S,
    head: &[u8],
    file_len: u64,
) -> std::io::Result<Header> {
    let magic = |at: usize, m: &[u8]| head.get(at..at + m.len()) == Some(m);
    let patches_only = |walked: std::io::Result<Option<Vec<Patch>>>, what| {
        walked.map(|found| Header {
            fix: found.map(|patches| Corrections {
                patches,
                splice: None,
                what: String::from(what),
            }),
            fact_frames: None,
        })
    };
    let walked = if magic(0, b"RIFF") && magic(8, b"WAVE") {
        let riff_size = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        wav_header(source, riff_size, file_len)
    } else if magic(0, b"FORM") && (magic(8, b"AIFF") || magic(8, b"AIFC")) {
        patches_only(
            aiff_sound(source, file_len),
            "AIFF: the sound chunk's size less its offset and block-size fields",
        )
    } else if magic(0, b"caff") {
        patches_only(
            caf_data(source, file_len),
            "CAF data chunk of unknown size (-1): read to the end of the file",
        )
    } else {
        Ok(Header::default())
    };
    // A header cut short is for the decoder to report, with the rest of the file's faults.
    let found = match walked {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Header::default(),
        other => other?,
    };
    source.seek(SeekFrom::Start(0))?;
    Ok(found)
}

/// How a container lays out its chunks.
#[derive(Clone, Copy)]
enum Layout {
    /// RIFF (little-endian) or IFF (big-endian): a 12-byte form header, then chunks of a
    /// 4-byte id and a u32 size, bodies padded to an even length.
    Riff { big_endian: bool },
    /// CAF: an 8-byte file header, then chunks of a 4-byte type and a big-endian i64 size
    /// (-1: to the end of the file), no padding.
    Caf,
}

/// One chunk's header: its id, its size as written, where the header and the body start.
struct Chunk {
    id: [u8; 4],
    size: i64,
    at: u64,
    body: u64,
}

/// Calls `visit` for each chunk until it returns `Some`, the file ends, a size leaves no
/// next chunk (negative or past any file), or `MAX_CHUNKS` chunks were seen.
fn walk_chunks<S: Read + Seek + ?Sized, T>(
    source: &mut S,
    file_len: u64,
    layout: Layout,
    mut visit: impl FnMut(&mut S, &Chunk) -> std::io::Result<Option<T>>,
) -> std::io::Result<Option<T>> {
    let (mut at, header_len) = match layout {
        Layout::Riff { .. } => (12u64, 8u64),
        Layout::Caf => (8, 12),
    };
    for _ in 0..MAX_CHUNKS {
        if at + header_len > file_len {
            return Ok(None);
        }
        source.seek(SeekFrom::Start(at))?;
        let mut header = [0u8; 12];
        let header = &mut header[..header_len as usize];
        source.read_exact(header)?;
        let size = match layout {
            Layout::Riff { big_endian: true } => i64::from(u32::from_be_bytes(
                header[4..8].try_into().expect("4 bytes"),
            )),
            Layout::Riff { big_endian: false } => i64::from(u32::from_le_bytes(
                header[4..8].try_into().expect("4 bytes"),
            )),
            Layout::Caf => i64::from_be_bytes(header[4..12].try_into().expect("8 bytes")),
        };
        let chunk = Chunk {
            id: header[..4].try_into().expect("4 bytes"),
            size,
            at,
            body: at + header_len,
        };
        if let Some(found) = visit(source, &chunk)? {
            return Ok(Some(found));
        }
        let padded = match layout {
            Layout::Riff { .. } => u64::try_from(size + (size & 1)),
            Layout::Caf => u64::try_from(size),
        };
        match padded.ok().and_then(|len| chunk.body.checked_add(len)) {
            Some(next) => at = next,
            None => return Ok(None),
        }
    }
    Ok(None)
}

/// Size values that writers leave when they cannot go back and fill them in.
fn is_placeholder(size: i64) -> bool {
    size == 0 || size == i64::from(u32::MAX)
}

/// A WAV file's fields to correct and its `fact` frames: a data chunk whose size is a
/// placeholder gets the RIFF and data sizes the file holds (whole frames of the fmt chunk's
/// block alignment), a LIST chunk whose size stops one byte short of its last subchunk's pad
/// gets that byte, and a PCM, IEEE float or G.711 fmt chunk of a size symphonia refuses is
/// read as its 16 fields and an empty cbSize.
/// `riff_size` is the size field of the file's RIFF header as written.
fn wav_header<S: Read + Seek + ?Sized>(
    source: &mut S,
    riff_size: u32,
    file_len: u64,
) -> std::io::Result<Header> {
    let (mut block_align, mut fact_frames) = (1u64, None);
    // Patches at offsets in the file; moved past the splice at the end.
    let (mut patches, mut splice) = (Vec::new(), None);
    let (mut streamed, mut list_pad, mut list_skipped) = (false, false, false);
    // An extensible fmt chunk read as its plain format: (that format's tag, why).
    let mut plain: Option<(u16, &str)> = None;
    // The fmt chunk's block alignment and bits per sample as read, when corrected.
    let (mut fmt_seen, mut frame_fields) = (false, None::<String>);
    // Where the RIFF size as written ends the file, and whether a chunk that starts before
    // that end runs past it.
    let riff_end = 8 + u64::from(riff_size);
    let (mut chunk_past_riff_end, mut chunk_past_file_end) = (false, false);
    walk_chunks(
        source,
        file_len,
        Layout::Riff { big_endian: false },
        |source, c| {
            let end = u64::try_from(c.size).map_or(u64::MAX, |size| c.body.saturating_add(size));
            // A chunk cut by the RIFF form's end, or the audio outside the form.
            if (c.at < riff_end && end > riff_end) || (&c.id == b"data" && c.at >= riff_end) {
                chunk_past_riff_end = true;
            }
            chunk_past_file_end |= end > file_len;
            // Only the first fmt chunk is corrected (a splice is one edit of the stream).
            if &c.id == b"fmt " && c.size >= 14 && !fmt_seen {
                fmt_seen = true;
                let fmt = fmt_chunk(source, c, file_len)?;
                block_align = fmt.block_align;
                patches.extend(fmt.patches);
                (splice, frame_fields, plain) = (fmt.splice, fmt.frame_fields, fmt.plain);
            }
            if &c.id == b"fact" && c.size >= 4 && fact_frames.is_none() {
                source.seek(SeekFrom::Start(c.body))?;
                let mut b = [0u8; 4];
                source.read_exact(&mut b)?;
                fact_frames = Some(u64::from(u32::from_le_bytes(b)));
            }
            if &c.id == b"LIST" {
                if let Some(patch) = list_short_of_its_pad(source, c, file_len)? {
                    patches.push(patch);
                    list_pad = true;
                } else if info_tags_overrun_their_list(source, c, file_len)? {
                    // symphonia refuses the whole file for its tags; ffmpeg warns and stops
                    // reading them. An id symphonia does not know is skipped whole (the RIFF
                    // rule for unknown chunks): the tags are lost, the audio is not.
                    patches.push(Patch {
                        offset: c.at,
                        bytes: b"JUNK".to_vec(),
                    });
                    list_skipped = true;
                }
            }
            if &c.id != b"data" || !is_placeholder(c.size) {
                // A LIST may follow the data chunk: the walk goes on past a real size.
                return Ok(None);
            }
            // Past a placeholder the rest of the file is audio: the walk ends here.
            let bytes = file_len - c.body;
            if let Ok(data_size) = u32::try_from(bytes - bytes % block_align) {
                let riff_size = u32::try_from(file_len - 8).unwrap_or(u32::MAX);
                patches.push(Patch {
                    offset: 4,
                    bytes: riff_size.to_le_bytes().to_vec(),
                });
                patches.push(Patch {
                    offset: c.at + 4,
                    bytes: data_size.to_le_bytes().to_vec(),
                });
                streamed = true;
            }
            Ok(Some(()))
        },
    )?;
    // The RIFF size, when the data size is real and the RIFF size is a placeholder or cuts a
    // chunk that the file holds more of: the file's length (a placeholder data size set both
    // above). In a file cut short (a chunk runs past its end) it is read as the largest size
    // instead, so that symphonia reaches the data chunk and decoding reports the truncation
    // (with a size of 0 it finds no data chunk).
    let riff_size_fixed = (!streamed
        && (is_placeholder(i64::from(riff_size)) || (chunk_past_riff_end && riff_end < file_len)))
        .then(|| {
            if chunk_past_file_end {
                u32::MAX
            } else {
                u32::try_from(file_len - 8).unwrap_or(u32::MAX)
            }
        })
        .filter(|&riff| riff != riff_size);
    if let Some(riff) = riff_size_fixed {
        patches.push(Patch {
            offset: 4,
            bytes: riff.to_le_bytes().to_vec(),
        });
    }
    if let Some(sp) = &splice {
        move_patches_past_splice(&mut patches, sp, riff_size);
    }
    let what: Vec<&str> = [
        (
            streamed,
            "sizes left at a placeholder (written to a pipe): read to the end of the file",
        ),
        (
            riff_size_fixed.is_some(),
            "RIFF size a placeholder or shorter than its chunks: read as the file's length",
        ),
        (
            list_pad,
            "LIST chunk one byte short of its last subchunk's pad: size + 1",
        ),
        (
            list_skipped,
            "LIST chunk whose INFO tags run past its end: skipped, tags and all",
        ),
        (
            splice.is_some() && plain.is_none(),
            "fmt chunk of a size symphonia refuses: read as its 16 fields and cbSize 0",
        ),
    ]
    .into_iter()
    .filter_map(|(found, what)| found.then_some(what))
    .collect();
    let extensible = plain.map(|(tag, why)| {
        format!(
            "extensible fmt chunk symphonia refuses ({why}): read as plain {}, the sub-format it names",
            format_name(tag)
        )
    });
    let what: Vec<&str> = what
        .into_iter()
        .chain(frame_fields.as_deref())
        .chain(extensible.as_deref())
        .collect();
    if what.is_empty() {
        return Ok(Header {
            fix: None,
            fact_frames,
        });
    }
    let what = format!("WAV header corrected: {}", what.join("; "));
    Ok(Header {
        fix: Some(Corrections {
            patches,
            splice,
            what,
        }),
        fact_frames,
    })
}

/// Moves file-offset patches to their offsets in the stream as read, where `sp` grew or
/// shrank it, and makes the RIFF size (at offset 4) count the change too, symphonia bounding
/// the chunks by it: the placeholder's correction if there is one, else `riff_size` as
/// written.
fn move_patches_past_splice(patches: &mut Vec<Patch>, sp: &Splice, riff_size: u32) {
    let grown = sp.bytes.len() as i64 - sp.removed as i64;
    for p in patches.iter_mut() {
        // Patches after the removed bytes move with the file's bytes; the walk put none
        // inside them.
        if p.offset >= sp.at + sp.removed {
            p.offset = p.offset.saturating_add_signed(grown);
        }
    }
    let riff = match patches.iter().position(|p| p.offset == 4) {
        Some(i) => u32::from_le_bytes(patches.remove(i).bytes.try_into().expect("4 bytes")),
        None => riff_size,
    };
    let riff = (i64::from(riff) + grown).clamp(0, i64::from(u32::MAX)) as u32;
    patches.push(Patch {
        offset: 4,
        bytes: riff.to_le_bytes().to_vec(),
    });
}

/// What reading a WAV fmt chunk found: its block alignment as read (at least 1) and the
/// corrections it needs.
struct FmtChunk {
    block_align: u64,
    /// Patches at offsets in the file (before any splice's).
    patches: Vec<Patch>,
    /// The chunk read as its 16 fields and cbSize 0.
    splice: Option<Splice>,
    /// The block alignment and bits per sample corrected, for the log.
    frame_fields: Option<String>,
    /// An extensible chunk read as its plain format: (that format's tag, why).
    plain: Option<(u16, &'static str)>,
}

/// Reads a WAV fmt chunk's fields for what symphonia would refuse of them: a block
/// alignment or bits per sample to read from each other, an extensible chunk to read as its
/// plain format, extension bytes of a format that uses none.
fn fmt_chunk<S: Read + Seek + ?Sized>(
    source: &mut S,
    c: &Chunk,
    file_len: u64,
) -> std::io::Result<FmtChunk> {
    // The 16 fields, cbSize and the 22 bytes of the extensible format's fields, as far as
    // the chunk (and the file) holds them.
    let mut f = [0u8; 40];
    let held = (c.size.min(40) as u64).min(file_len.saturating_sub(c.body)) as usize;
    source.seek(SeekFrom::Start(c.body))?;
    source.read_exact(&mut f[..held])?;
    let le16 = |f: &[u8; 40], at: usize| u16::from_le_bytes([f[at], f[at + 1]]);
    let tag = le16(&f, 0);
    let sub_format = (tag == WAVE_FORMAT_EXTENSIBLE && held == 40)
        .then(|| extensible_sub_format(&f))
        .flatten();
    let (mut patches, mut frame_fields) = (Vec::new(), None);
    if held >= 16 {
        let (align, bits) = (le16(&f, 12), le16(&f, 14));
        let format = sub_format.unwrap_or(tag);
        let read = frame_fields_as_ffmpeg_reads_them(
            format,
            sub_format.is_some(),
            le16(&f, 2),
            align,
            bits,
        );
        if let Some((new_align, new_bits)) = read {
            for (at, old, new) in [(12, align, new_align), (14, bits, new_bits)] {
                if old != new {
                    patches.push(Patch {
                        offset: c.body + at as u64,
                        bytes: new.to_le_bytes().to_vec(),
                    });
                    f[at..at + 2].copy_from_slice(&new.to_le_bytes());
                }
            }
            frame_fields = Some(format!(
                "block alignment {align} and {bits} bits per sample: read as {new_align} and \
                 {new_bits}"
            ));
        }
    }
    let block_align = u64::from(le16(&f, 12)).max(1);
    let cb_size = (held >= 18).then(|| le16(&f, 16));
    let mut plain = sub_format.and_then(|sub| extensible_read_as_plain(&f, sub, c.size));
    let mut splice = None;
    if plain.is_some() || symphonia_refuses_fmt_size(tag, c.size, cb_size) {
        // These formats use no extension: an fmt chunk is their 16 fields, then (G.711
        // always, PCM and IEEE float optionally) cbSize 0. Writers that treat G.711 as PCM
        // leave cbSize out, others leave extension bytes these formats do not read, and
        // symphonia 0.5 refuses both where ffmpeg and libsndfile read them. The stream as
        // read has the 16 fields and cbSize 0 in place of what follows them (and its pad).
        // An extensible chunk symphonia refuses is read so too, with its tag the plain
        // format's. A chunk that runs past the file's end is for symphonia to report.
        let fields_end = c.body + c.size as u64;
        if fields_end > file_len {
            plain = None;
        } else {
            if let Some((plain_tag, _)) = plain {
                patches.push(Patch {
                    offset: c.body,
                    bytes: plain_tag.to_le_bytes().to_vec(),
                });
            }
            let end = (fields_end + (c.size as u64 & 1)).min(file_len);
            splice = Some(Splice {
                at: c.body + 16,
                removed: end - (c.body + 16),
                bytes: vec![0, 0],
            });
            patches.push(Patch {
                offset: c.at + 4,
                bytes: 18u32.to_le_bytes().to_vec(),
            });
        }
    }
    Ok(FmtChunk {
        block_align,
        patches,
        splice,
        frame_fields,
        plain,
    })
}

/// The plain format tag an extensible fmt chunk's sub-format GUID names (`f`: its first
/// 40 bytes), when the GUID is of the KSDATAFORMAT_SUBTYPE family that names one.
fn extensible_sub_format(f: &[u8; 40]) -> Option<u16> {
    (f[26..28] == [0, 0] && f[28..40] == SUBTYPE_GUID_TAIL)
        .then(|| u16::from_le_bytes([f[24], f[25]]))
}

/// WAV format tags: integer PCM, IEEE float, G.711 A-law and mu-law, and the extensible
/// format (whose sub-format GUID names one of the others).
const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 3;
const WAVE_FORMAT_ALAW: u16 = 6;
const WAVE_FORMAT_MULAW: u16 = 7;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;

/// The last 14 bytes of the sub-format GUIDs (KSDATAFORMAT_SUBTYPE_*, ksmedia.h) that name a
/// plain format tag: the tag is in the first two bytes, then two zero bytes.
const SUBTYPE_GUID_TAIL: [u8; 12] = [
    0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
];

/// The channel positions symphonia 0.5 knows (FRONT_LEFT .. LFE2).
const SYMPHONIA_CHANNELS: u32 = 0x03FF_FFFF;

fn format_name(tag: u16) -> &'static str {
    match tag {
        WAVE_FORMAT_PCM => "PCM",
        WAVE_FORMAT_IEEE_FLOAT => "IEEE float",
        WAVE_FORMAT_ALAW => "A-law",
        WAVE_FORMAT_MULAW => "mu-law",
        _ => "format",
    }
}

/// For a WAVE_FORMAT_EXTENSIBLE fmt chunk (`f`: its first 40 bytes; `sub_format`: the tag
/// its GUID names; `size`: its size as written) that symphonia 0.5 refuses while ffmpeg reads it, the plain format its
/// sub-format GUID names (PCM, IEEE float, A-law, mu-law) and why symphonia refuses it.
/// ffmpeg reads the extension when cbSize is 22 or more and takes the codec from the GUID;
/// it does not decode by the channel mask, and takes the sample width from the valid bits
/// when they are set (checked with PyAV: an s24 file marked 32 valid bits decodes as s32,
/// 34,902 samples of noise for 46,536): there earshot decodes by the container width, which
/// the frames have. symphonia refuses a cbSize other than 22, a channel mask it
/// cannot map (speaker bits past LFE2, as SPEAKER_ALL's 0x80000000), valid bits above the
/// container's (or, for float, other than them), and the mu-law GUID (it expects 0x0004, a
/// different format's). Read as the plain format, such a file decodes to the same samples:
/// the channels are counted, not placed, and are mixed to mono anyway. A cbSize under 22
/// (no extension, for ffmpeg too), other sub-formats and chunks symphonia reads are left as
/// they are.
fn extensible_read_as_plain(
    f: &[u8; 40],
    sub_format: u16,
    size: i64,
) -> Option<(u16, &'static str)> {
    let le16 = |at: usize| u16::from_le_bytes([f[at], f[at + 1]]);
    let (channels, container_bits, cb_size, valid_bits) = (le16(2), le16(14), le16(16), le16(18));
    let mask = u32::from_le_bytes(f[20..24].try_into().expect("4 bytes"));
    if size < 40 || cb_size < 22 {
        return None;
    }
    let why = if sub_format == WAVE_FORMAT_MULAW {
        "the mu-law sub-format"
    } else if cb_size != 22 {
        "cbSize other than 22"
    } else if symphonia_channel_mask(mask, channels).is_none_or(|m| m & !SYMPHONIA_CHANNELS != 0) {
        "a channel mask with positions it does not know"
    } else if valid_bits > container_bits
        || (sub_format == WAVE_FORMAT_IEEE_FLOAT && valid_bits != container_bits)
    {
        "valid bits other than the sample width allows"
    } else {
        return None;
    };
    matches!(
        sub_format,
        WAVE_FORMAT_PCM | WAVE_FORMAT_IEEE_FLOAT | WAVE_FORMAT_ALAW | WAVE_FORMAT_MULAW
    )
    .then_some((sub_format, why))
}

/// The block alignment and bits per sample that ffmpeg decodes a PCM, IEEE float or G.711
/// fmt chunk by (`format`: the tag, or an extensible chunk's sub-format), where symphonia
/// 0.5 cannot read the ones written: a block alignment of 0 ("block size is 0" at the first
/// packet) is the channels times the sample width; bits per sample that are no sample
/// width symphonia decodes are the whole bytes they take (12 bits sit in 16, the low bits
/// zero), as ffmpeg picks the PCM decoder by rounding them up. Bits of 0 or past 64 name no
/// decoder for a plain chunk, and ffmpeg refuses it too; an extensible chunk names its
/// codec by its GUID, and the width is then the block alignment's. `None` when the fields
/// are fine or say too little to correct (both unknown, or a width the block alignment
/// contradicts).
fn frame_fields_as_ffmpeg_reads_them(
    format: u16,
    extensible: bool,
    channels: u16,
    block_align: u16,
    bits: u16,
) -> Option<(u16, u16)> {
    // Bytes a sample may take, in symphonia's decoders.
    let widths: &[u16] = match format {
        WAVE_FORMAT_PCM => &[1, 2, 3, 4],
        WAVE_FORMAT_IEEE_FLOAT => &[4, 8],
        WAVE_FORMAT_ALAW | WAVE_FORMAT_MULAW => &[1],
        _ => return None,
    };
    if channels == 0 {
        return None;
    }
    let width_of_align = block_align
        .is_multiple_of(channels)
        .then(|| block_align / channels)
        .filter(|w| widths.contains(w));
    // G.711 is read a byte a sample whatever the bits say.
    let g711 = widths == [1];
    let bits_read = if g711 || (bits.is_multiple_of(8) && widths.contains(&(bits / 8))) {
        bits
    } else if bits == 0 || bits > 64 {
        if !extensible {
            return None;
        }
        width_of_align? * 8
    } else {
        let width = bits.div_ceil(8);
        let agrees = width_of_align == Some(width) || (block_align == 0 && widths.contains(&width));
        if !agrees {
            return None;
        }
        width * 8
    };
    let align_read = if block_align == 0 {
        let width = if g711 { 1 } else { bits_read / 8 };
        if !widths.contains(&width) {
            return None;
        }
        channels.checked_mul(width)?
    } else {
        block_align
    };
    (align_read != block_align || bits_read != bits).then_some((align_read, bits_read))
}

/// The channel mask symphonia 0.5 makes of `mask` for `channels` channels
/// (`fix_channel_mask`: positions added above the highest one when too few, the highest
/// removed when too many); `None` where its arithmetic would overflow.
fn symphonia_channel_mask(mut mask: u32, channels: u16) -> Option<u32> {
    let diff = i32::from(channels) - mask.count_ones() as i32;
    if diff > 0 {
        let shift = 32 - mask.leading_zeros();
        let added = 1u32.checked_shl(diff as u32)?.wrapping_sub(1);
        if shift >= 32 {
            return None;
        }
        mask |= added.checked_shl(shift)?;
        // Bits shifted out of the u32 are lost positions.
        (mask.count_ones() == u32::from(channels)).then_some(mask)
    } else {
        while mask.count_ones() > u32::from(channels) {
            mask &= !(1 << (31 - mask.leading_zeros()));
        }
        Some(mask)
    }
}

/// Whether symphonia 0.5 refuses an fmt chunk of `size` bytes (`cb_size`: its cbSize field,
/// when it has one) for a format that uses no extension, which ffmpeg and libsndfile read:
/// PCM takes 16, 18 or 40 bytes, IEEE float the same but cbSize 0 at 18, G.711 18 bytes
/// with cbSize 0.
/// A chunk shorter than the 16 fields is malformed, for symphonia to report.
fn symphonia_refuses_fmt_size(tag: u16, size: i64, cb_size: Option<u16>) -> bool {
    if size < 16 {
        return false;
    }
    match tag {
        WAVE_FORMAT_PCM => !matches!(size, 16 | 18 | 40),
        WAVE_FORMAT_IEEE_FLOAT => !(matches!(size, 16 | 40) || (size == 18 && cb_size == Some(0))),
        WAVE_FORMAT_ALAW | WAVE_FORMAT_MULAW => !(size == 18 && cb_size == Some(0)),
        _ => false,
    }
}

/// A WAV LIST chunk (INFO tags, cue labels) of odd size whose last subchunk is odd and ends
/// exactly at the LIST's end: its pad byte lies just past the LIST, where the outer chunk
/// walk skips it anyway (an odd chunk is padded). Some writers count the subchunks' pads but
/// not the last one; ffmpeg and libsndfile read such files, symphonia 0.5 refuses the whole
/// file ("chunk length exceeds parent (list) chunk length"). The patch counts the pad in the
/// LIST's size, which leaves every chunk where it was. Anything else is left to the decoder.
fn list_short_of_its_pad<S: Read + Seek + ?Sized>(
    source: &mut S,
    list: &Chunk,
    file_len: u64,
) -> std::io::Result<Option<Patch>> {
    let Ok(size) = u32::try_from(list.size) else {
        return Ok(None);
    };
    let Some(padded) = size.checked_add(1) else {
        return Ok(None);
    };
    let end = list.body + u64::from(size);
    if size & 1 == 0 || size < 4 || end + 1 > file_len {
        return Ok(None);
    }
    // The subchunks follow the LIST's 4-byte type (INFO, adtl).
    let last_odd = walk_subchunks(source, list.body + 4, end, |at, sub| {
        (at + 8 + sub == end).then_some(sub & 1 == 1)
    })?;
    Ok(last_odd.filter(|&odd| odd).map(|_| Patch {
        offset: list.at + 4,
        bytes: padded.to_le_bytes().to_vec(),
    }))
}

/// Calls `visit(at, size)` for each subchunk header of a LIST body, from `at`, while a whole
/// header fits before `end` (where symphonia stops too), stepping over each padded body,
/// until `visit` returns `Some`.
fn walk_subchunks<S: Read + Seek + ?Sized, T>(
    source: &mut S,
    mut at: u64,
    end: u64,
    mut visit: impl FnMut(u64, u64) -> Option<T>,
) -> std::io::Result<Option<T>> {
    for _ in 0..MAX_CHUNKS {
        if at + 8 > end {
            return Ok(None);
        }
        source.seek(SeekFrom::Start(at + 4))?;
        let mut b = [0u8; 4];
        source.read_exact(&mut b)?;
        let sub = u64::from(u32::from_le_bytes(b));
        if let Some(found) = visit(at, sub) {
            return Ok(Some(found));
        }
        at += 8 + sub + (sub & 1);
    }
    Ok(None)
}

/// Whether a WAV LIST chunk of INFO tags, which lies inside the file, holds a subchunk
/// whose size runs past the LIST's end (symphonia 0.5 parses INFO lists and refuses the
/// whole file: "chunk length exceeds parent (list) chunk length"; other forms it skips).
fn info_tags_overrun_their_list<S: Read + Seek + ?Sized>(
    source: &mut S,
    list: &Chunk,
    file_len: u64,
) -> std::io::Result<bool> {
    let Ok(size) = u64::try_from(list.size) else {
        return Ok(false);
    };
    let end = list.body + size;
    if size < 4 || end > file_len {
        return Ok(false);
    }
    source.seek(SeekFrom::Start(list.body))?;
    let mut form = [0u8; 4];
    source.read_exact(&mut form)?;
    if &form != b"INFO" {
        return Ok(false);
    }
    let overrun = walk_subchunks(source, list.body + 4, end, |at, sub| {
        (sub > end - (at + 8)).then_some(())
    })?;
    Ok(overrun.is_some())
}

/// An AIFF/AIFC SSND chunk: its size less the 8 bytes of its offset and block-size fields.
fn aiff_sound<S: Read + Seek + ?Sized>(
    source: &mut S,
    file_len: u64,
) -> std::io::Result<Option<Vec<Patch>>> {
    walk_chunks(
        source,
        file_len,
        Layout::Riff { big_endian: true },
        |_, c| {
            if &c.id != b"SSND" {
                return Ok(None);
            }
            // The size was a u32, so less 8 it still is when it is not negative.
            Ok(Some(u32::try_from(c.size - 8).ok().map(|samples| {
                vec![Patch {
                    offset: c.at + 4,
                    bytes: samples.to_be_bytes().to_vec(),
                }]
            })))
        },
    )
    .map(Option::flatten)
}

/// A CAF data chunk of size -1: its size as the bytes from its body to the end of the file.
fn caf_data<S: Read + Seek + ?Sized>(
    source: &mut S,
    file_len: u64,
) -> std::io::Result<Option<Vec<Patch>>> {
    walk_chunks(source, file_len, Layout::Caf, |_, c| {
        if &c.id != b"data" {
            return Ok(None);
        }
        if c.size != -1 {
            return Ok(Some(None));
        }
        Ok(Some(i64::try_from(file_len - c.body).ok().map(|bytes| {
            vec![Patch {
                offset: c.at + 4,
                bytes: bytes.to_be_bytes().to_vec(),
            }]
        })))
    })
    .map(Option::flatten)
}

/// A media source read as the file corrected: the splice's bytes appear at its offset in
/// place of the file's bytes it removes (the file's bytes after those follow them) and the
/// patches' bytes at theirs. Positions and lengths are those of the stream as read.
pub struct PatchedSource {
    inner: Box<dyn MediaSource>,
    patches: Vec<Patch>,
    splice: Option<Splice>,
    /// Position in the stream as read.
    pos: u64,
    /// Position of `inner`, so that it is sought only where the splice skips bytes.
    inner_pos: u64,
}

impl PatchedSource {
    /// `inner` must be at its start.
    pub fn new(inner: Box<dyn MediaSource>, fix: Corrections) -> Self {
        Self {
            inner,
            patches: fix.patches,
            splice: fix.splice,
            pos: 0,
            inner_pos: 0,
        }
    }

    /// (where the splice starts, the bytes it reads, the file's bytes it removes); an empty
    /// one at the end when there is none.
    fn spliced(&self) -> (u64, u64, u64) {
        self.splice.as_ref().map_or((u64::MAX, 0, 0), |s| {
            (s.at, s.bytes.len() as u64, s.removed)
        })
    }

    /// Where in the file the stream's position `pos` reads from: before the splice as it
    /// is, after it moved by its change in length; inside it, the file waits past the bytes
    /// it removes.
    fn file_offset(&self, pos: u64) -> u64 {
        let (at, len, removed) = self.spliced();
        if pos < at {
            pos
        } else if pos < at + len {
            at + removed
        } else {
            pos - len + removed
        }
    }

    /// Reads from the file at the stream position `self.pos`, into `buf`.
    fn read_inner(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self.file_offset(self.pos);
        if self.inner_pos != want {
            self.inner_pos = self.inner.seek(SeekFrom::Start(want))?;
        }
        let n = self.inner.read(buf)?;
        self.inner_pos += n as u64;
        Ok(n)
    }
}

impl Read for PatchedSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (at, len, _) = self.spliced();
        let start = self.pos;
        let n = if start < at {
            // Up to the splice at most, so that its bytes come next.
            let room = usize::try_from(at - start).unwrap_or(usize::MAX);
            let k = buf.len().min(room);
            self.read_inner(&mut buf[..k])?
        } else if start < at + len {
            let bytes = &self.splice.as_ref().expect("a splice").bytes;
            let from = (start - at) as usize;
            let k = buf.len().min(bytes.len() - from);
            buf[..k].copy_from_slice(&bytes[from..from + k]);
            k
        } else {
            self.read_inner(buf)?
        };
        let end = start + n as u64;
        for p in &self.patches {
            for (i, &b) in p.bytes.iter().enumerate() {
                let offset = p.offset + i as u64;
                if (start..end).contains(&offset) {
                    buf[(offset - start) as usize] = b;
                }
            }
        }
        self.pos = end;
        Ok(n)
    }
}

impl Seek for PatchedSource {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => {
                let real_end = self.inner.seek(SeekFrom::End(0))?;
                self.inner_pos = real_end;
                self.len_as_read(real_end).checked_add_signed(d)
            }
        };
        let Some(target) = target else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            ));
        };
        let real = self.file_offset(target);
        self.inner_pos = self.inner.seek(SeekFrom::Start(real))?;
        self.pos = target;
        Ok(target)
    }
}

impl PatchedSource {
    /// The stream's length for a file of `file_len` bytes.
    fn len_as_read(&self, file_len: u64) -> u64 {
        let (at, len, removed) = self.spliced();
        if file_len <= at {
            file_len
        } else {
            (file_len.max(at + removed) - removed) + len
        }
    }
}

impl MediaSource for PatchedSource {
    fn is_seekable(&self) -> bool {
        self.inner.is_seekable()
    }

    fn byte_len(&self) -> Option<u64> {
        self.inner.byte_len().map(|l| self.len_as_read(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

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

    /// The file as symphonia will read it.
    fn corrected(file: &[u8]) -> Option<Vec<u8>> {
        let mut src = Cursor::new(file.to_vec());
        let fix = inspect(&mut src, file, file.len() as u64).unwrap().fix?;
        assert_eq!(src.position(), 0, "left at the start");
        let mut out = Vec::new();
        PatchedSource::new(Box::new(src), fix)
            .read_to_end(&mut out)
            .unwrap();
        Some(out)
    }

    #[test]
    fn wav_placeholders_get_the_file_s_sizes_and_real_sizes_are_left_alone() {
        let pcm = vec![1u8; 101]; // an odd byte at the end: not a whole 2-byte frame
        for placeholder in [0, u32::MAX] {
            let file = wav(placeholder, placeholder, &pcm, 2);
            let got = corrected(&file).expect("corrected");
            assert_eq!(&got[4..8], &(file.len() as u32 - 8).to_le_bytes());
            assert_eq!(&got[40..44], &100u32.to_le_bytes());
            assert_eq!(&got[8..40], &file[8..40]);
            assert_eq!(&got[44..], &file[44..], "the samples are untouched");
        }
        // A real size, even one the file cannot hold (truncated), is not touched.
        assert_eq!(corrected(&wav(36 + 1000, 1000, &pcm, 2)), None);
        assert_eq!(corrected(b"OggS........"), None);
    }

    /// A RIFF size left at a placeholder, or cutting a chunk the file holds, is read as the
    /// file's length; one that leaves bytes after the last chunk, or belongs to a file cut
    /// short, is left alone.
    #[test]
    fn a_riff_size_that_misstates_the_chunks_is_read_as_the_file_s_length() {
        let pcm = vec![7u8; 100];
        let whole = wav(36 + 100, 100, &pcm, 2);
        let len_less_8 = (whole.len() as u32 - 8).to_le_bytes();
        for riff in [0, u32::MAX, 36 + 50, 20, 4] {
            let file = wav(riff, 100, &pcm, 2);
            let got = corrected(&file).unwrap_or_else(|| panic!("RIFF size {riff}"));
            assert_eq!(&got[4..8], &len_less_8, "RIFF size {riff}");
            assert_eq!(&got[..4], &file[..4]);
            assert_eq!(
                &got[8..],
                &file[8..],
                "RIFF size {riff}: the rest untouched"
            );
        }
        assert_eq!(corrected(&whole), None);
        // An appended tag after the RIFF form: no chunk inside the form runs past its end.
        let mut tagged = whole.clone();
        tagged.extend(b"TAG0123456789");
        assert_eq!(corrected(&tagged), None);
        // Cut short (the data chunk runs past the end): truncation is the decoder's to report,
        // so the RIFF size lets the data chunk be reached (the largest size) or is left alone.
        for (riff, read_as) in [(0, Some(u32::MAX)), (20, Some(u32::MAX)), (u32::MAX, None)] {
            let cut = &wav(riff, 100, &pcm, 2)[..80];
            let got = corrected(cut);
            assert_eq!(
                got.as_ref().map(|g| &g[4..8]),
                read_as.map(u32::to_le_bytes).as_ref().map(|b| &b[..]),
                "RIFF size {riff}, cut"
            );
        }
        assert_eq!(corrected(&wav(36 + 50, 100, &pcm, 2)[..80]), None);
    }

    /// A WAV of `chunks` (id, size as written, body) after the RIFF header.
    fn riff(chunks: &[(&[u8; 4], u32, &[u8])]) -> Vec<u8> {
        let mut w = b"RIFF\0\0\0\0WAVE".to_vec();
        for (id, size, body) in chunks {
            w.extend(*id);
            w.extend(size.to_le_bytes());
            w.extend(*body);
        }
        let len = w.len() as u32 - 8;
        w[4..8].copy_from_slice(&len.to_le_bytes());
        w
    }

    #[test]
    fn a_list_chunk_short_of_its_last_pad_gets_the_byte_and_nothing_else_is_touched() {
        let fmt = [0u8; 16];
        let pcm = [3u8; 64];
        // INFO, one even subchunk, then an odd one whose pad lies past the LIST's size.
        let info = b"INFOINAM\x02\0\0\0abISFT\x03\0\0\0abc\0";
        let short = info.len() as u32 - 1;
        for list_first in [true, false] {
            let list = (b"LIST", short, &info[..]);
            let chunks = if list_first {
                [(b"fmt ", 16, &fmt[..]), list, (b"data", 64, &pcm[..])]
            } else {
                [(b"fmt ", 16, &fmt[..]), (b"data", 64, &pcm[..]), list]
            };
            let file = riff(&chunks);
            let at = file.windows(4).position(|w| w == b"LIST").unwrap();
            let got = corrected(&file).expect("corrected");
            assert_eq!(&got[at + 4..at + 8], &(short + 1).to_le_bytes());
            assert_eq!(&got[..at + 4], &file[..at + 4]);
            assert_eq!(&got[at + 8..], &file[at + 8..]);
        }
        // Right sizes, an even last subchunk: untouched; a subchunk that overruns the LIST
        // by more than a pad gets no pad byte (the LIST is skipped instead).
        let right = riff(&[(b"fmt ", 16, &fmt), (b"LIST", short + 1, info)]);
        assert_eq!(corrected(&right), None);
        let even = b"INFOINAM\x02\0\0\0ab\0";
        assert_eq!(corrected(&riff(&[(b"LIST", 15, even)])), None);
        let overrun = b"INFOINAM\x09\0\0\0abc\0";
        let got = corrected(&riff(&[(b"LIST", 15, overrun)])).expect("skipped");
        assert_eq!(&got[12..20], b"JUNK\x0f\0\0\0");
        // Past a data size left at a placeholder everything is audio, even bytes that look
        // like a LIST chunk short of its pad.
        let mut audio = b"LIST".to_vec();
        audio.extend(short.to_le_bytes());
        audio.extend(info);
        let streamed = riff(&[(b"fmt ", 16, &fmt), (b"data", u32::MAX, &audio)]);
        let got = corrected(&streamed).expect("the placeholder corrected");
        let data = streamed.windows(4).position(|w| w == b"data").unwrap();
        assert_eq!(
            &got[data + 8..],
            &streamed[data + 8..],
            "the audio is untouched"
        );
    }

    #[test]
    fn the_aiff_sound_chunk_loses_its_8_bytes_of_fields_wherever_it_is() {
        // A 5,000-byte filler chunk first (Apple's FLLR), so SSND is far from the start.
        let mut a = b"FORM\0\0\0\0AIFFCOMM\0\0\0\x12".to_vec();
        a.extend([0u8; 18]);
        a.extend(b"FLLR");
        a.extend(5000u32.to_be_bytes());
        a.extend(vec![0u8; 5000]);
        let ssnd = a.len();
        a.extend(b"SSND\0\0\0\x18");
        a.extend([7u8; 8 + 16]);
        let got = corrected(&a).expect("corrected");
        assert_eq!(&got[ssnd..ssnd + 8], b"SSND\0\0\0\x10");
        assert_eq!(&got[..ssnd + 4], &a[..ssnd + 4]);
        assert_eq!(&got[ssnd + 8..], &a[ssnd + 8..]);
    }

    #[test]
    fn a_caf_data_chunk_of_unknown_size_gets_the_bytes_to_the_end() {
        let mut c = b"caff\0\x01\0\0desc".to_vec();
        c.extend(32i64.to_be_bytes());
        c.extend([0u8; 32]);
        c.extend(b"free");
        c.extend(3i64.to_be_bytes());
        c.extend([0u8; 3]);
        let data = c.len();
        c.extend(b"data");
        c.extend((-1i64).to_be_bytes());
        c.extend([0u8; 4]); // edit count
        c.extend([5u8; 101]);
        let got = corrected(&c).expect("corrected");
        assert_eq!(&got[data + 4..data + 12], &105i64.to_be_bytes());
        assert_eq!(&got[..data + 4], &c[..data + 4]);
        assert_eq!(
            &got[data + 12..],
            &c[data + 12..],
            "the samples are untouched"
        );
        // A known size, even one larger than the file (truncated), is left alone.
        let mut known = c.clone();
        known[data + 4..data + 12].copy_from_slice(&5000i64.to_be_bytes());
        assert_eq!(corrected(&known), None);
    }

    #[test]
    fn a_splice_reads_and_seeks_as_the_corrected_file() {
        let file: Vec<u8> = (0..=199u8).collect();
        // An insertion (nothing removed), a splice that removes more than it puts and one
        // that puts more than it removes.
        for removed in [0usize, 7, 1] {
            let (at, spliced) = (50usize, vec![0xEE, 0xEF]);
            // A patch before the splice and one after it (offsets as read).
            let fix = Corrections {
                patches: vec![
                    Patch {
                        offset: 10,
                        bytes: vec![0xAA; 2],
                    },
                    Patch {
                        offset: 60,
                        bytes: vec![0xBB; 3],
                    },
                ],
                splice: Some(Splice {
                    at: at as u64,
                    removed: removed as u64,
                    bytes: spliced.clone(),
                }),
                what: String::new(),
            };
            let mut want = file[..at].to_vec();
            want.extend(&spliced);
            want.extend(&file[at + removed..]);
            want[10..12].fill(0xAA);
            want[60..63].fill(0xBB);
            let len = want.len();
            let mut src = PatchedSource::new(Box::new(Cursor::new(file.clone())), fix);
            assert_eq!(src.byte_len(), Some(len as u64), "removed {removed}");
            for chunk in [1usize, 3, 7, 64] {
                src.seek(SeekFrom::Start(0)).unwrap();
                let (mut got, mut buf) = (Vec::<u8>::new(), vec![0u8; chunk]);
                loop {
                    let n = src.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend(&buf[..n]);
                }
                assert_eq!(got, want, "removed {removed}, reads of {chunk}");
            }
            for (to, pos) in [
                (SeekFrom::Start(51), 51usize), // inside the splice
                (SeekFrom::Start(49), 49),
                (SeekFrom::End(-5), len - 5),
                (SeekFrom::Start(52), 52), // just after it
                (SeekFrom::Current(-3), 49),
                (SeekFrom::Start(50), 50),
            ] {
                assert_eq!(src.seek(to).unwrap(), pos as u64, "{to:?}");
                let mut b = [0u8; 6];
                let n = src.read(&mut b).unwrap();
                assert_eq!(
                    &b[..n],
                    &want[pos..pos + n],
                    "removed {removed}, after {to:?}"
                );
                src.seek(SeekFrom::Start(pos as u64)).unwrap();
            }
            assert!(src.seek(SeekFrom::Current(-1000)).is_err());
        }
    }

    #[test]
    fn the_fact_count_comes_with_the_same_walk_with_or_without_corrections() {
        let fmt = [0u8; 16];
        let fact = 1234u32.to_le_bytes();
        let header = |file: &[u8]| {
            let mut src = Cursor::new(file.to_vec());
            let h = inspect(&mut src, file, file.len() as u64).unwrap();
            assert_eq!(src.position(), 0, "left at the start");
            h
        };
        let plain = riff(&[
            (b"fmt ", 16, &fmt),
            (b"fact", 4, &fact),
            (b"data", 4, &[0; 4]),
        ]);
        assert_eq!(
            header(&plain),
            Header {
                fix: None,
                fact_frames: Some(1234)
            }
        );
        let piped = riff(&[
            (b"fmt ", 16, &fmt),
            (b"fact", 4, &fact),
            (b"data", 0, &[0; 4]),
        ]);
        let h = header(&piped);
        assert_eq!(h.fact_frames, Some(1234));
        assert!(h.fix.is_some(), "the placeholder is corrected too");
        let none = riff(&[(b"fmt ", 16, &fmt), (b"data", 4, &[0; 4])]);
        assert_eq!(header(&none), Header::default());
    }

    #[test]
    fn a_g711_fmt_chunk_without_cb_size_gets_one() {
        for tag in [6u16, 7] {
            let mut fmt = tag.to_le_bytes().to_vec();
            fmt.extend([1, 0, 0x40, 0x1F, 0, 0, 0x40, 0x1F, 0, 0, 1, 0, 8, 0]);
            let samples = [0x55u8; 9];
            let file = riff(&[(b"fmt ", 16, &fmt), (b"data", 9, &samples)]);
            let got = corrected(&file).expect("corrected");
            assert_eq!(got.len(), file.len() + 2);
            // RIFF size + 2, fmt size 18, cbSize 0, then the rest of the file as it was.
            let riff_size = u32::from_le_bytes(file[4..8].try_into().unwrap());
            assert_eq!(&got[4..8], &(riff_size + 2).to_le_bytes());
            assert_eq!(&got[12..20], b"fmt \x12\0\0\0");
            assert_eq!(&got[20..36], &fmt[..]);
            assert_eq!(&got[36..38], &[0, 0]);
            assert_eq!(&got[38..], &file[36..]);
        }
        // PCM's 16-byte fmt chunk is right as it is.
        let mut pcm = 1u16.to_le_bytes().to_vec();
        pcm.extend([1, 0, 0x40, 0x1F, 0, 0, 0x80, 0x3E, 0, 0, 2, 0, 16, 0]);
        assert_eq!(corrected(&riff(&[(b"fmt ", 16, &pcm)])), None);
    }

    /// PCM, IEEE float and G.711 fmt chunks with bytes after their 16 fields that symphonia
    /// refuses are read as the fields and cbSize 0, with the chunks after them and the RIFF
    /// size moved by as much; the sizes symphonia reads are left alone.
    #[test]
    fn fmt_chunks_with_extra_bytes_are_read_as_their_fields_and_an_empty_cb_size() {
        let fields = |tag: u16| {
            let mut f = tag.to_le_bytes().to_vec();
            f.extend([1, 0, 0x80, 0x3E, 0, 0, 0, 0x7D, 0, 0, 2, 0, 16, 0]);
            f
        };
        let samples = [0x11u8, 0x22, 0x33, 0x44];
        // (format tag, fmt size, cbSize as written)
        for (tag, size, cb) in [
            (1u16, 20u32, 2u16),
            (1, 17, 0),
            (1, 22, 4),
            (1, 50, 32),
            (3, 20, 2),
            (3, 18, 5),
            (6, 20, 2),
            (7, 22, 0),
        ] {
            let mut body = fields(tag);
            if size >= 18 {
                body.extend(cb.to_le_bytes());
            }
            body.resize(size as usize, 0x99);
            if size % 2 == 1 {
                body.push(0); // the pad after an odd chunk
            }
            let file = riff(&[(b"fmt ", size, &body), (b"data", 4, &samples)]);
            let what = format!("tag {tag}, fmt size {size}");
            let got = corrected(&file).unwrap_or_else(|| panic!("{what}: not corrected"));
            let mut want = riff(&[
                (b"fmt ", 18, &[&fields(tag)[..], &[0, 0]].concat()),
                (b"data", 4, &samples),
            ]);
            // The RIFF size as written, moved by the change in the fmt chunk's length.
            let written = u32::from_le_bytes(file[4..8].try_into().unwrap());
            let moved = written as i64 + want.len() as i64 - file.len() as i64;
            want[4..8].copy_from_slice(&(moved as u32).to_le_bytes());
            assert_eq!(got, want, "{what}");
        }
        for (tag, size) in [
            (1u16, 16u32),
            (1, 18),
            (1, 40),
            (3, 16),
            (3, 18),
            (3, 40),
            (6, 18),
        ] {
            let mut body = fields(tag);
            body.resize(size as usize, 0);
            let file = riff(&[(b"fmt ", size, &body), (b"data", 4, &samples)]);
            assert_eq!(corrected(&file), None, "tag {tag}, fmt size {size}");
        }
        // G.711 at 18 bytes with a cbSize other than 0 (as ffmpeg reads it: no extension).
        let mut g711 = fields(7);
        g711.extend(3u16.to_le_bytes());
        let file = riff(&[(b"fmt ", 18, &g711), (b"data", 4, &samples)]);
        let got = corrected(&file).expect("G.711 with cbSize 3 corrected");
        assert_eq!(&got[36..38], &[0, 0]);
        assert_eq!(got.len(), file.len());
        // Shorter than its fields, or running past the file: for the decoder to report.
        let short = riff(&[(b"fmt ", 14, &fields(1)[..14])]);
        assert_eq!(corrected(&short), None);
        let mut past = riff(&[(b"fmt ", 20, &[fields(1), vec![0; 4]].concat())]);
        past[16..20].copy_from_slice(&400u32.to_le_bytes());
        assert_eq!(corrected(&past), None);
    }

    /// An extensible fmt chunk: `channels` channels of `bits`-bit samples in the container,
    /// `valid` of them valid, the channel `mask`, the sub-format GUID naming `sub_format`,
    /// `cb` as cbSize and `size` bytes in all.
    fn extensible_fmt(
        channels: u16,
        bits: u16,
        cb: u16,
        valid: u16,
        mask: u32,
        sub_format: u16,
        size: usize,
    ) -> Vec<u8> {
        let mut f = WAVE_FORMAT_EXTENSIBLE.to_le_bytes().to_vec();
        f.extend(channels.to_le_bytes());
        f.extend(16_000u32.to_le_bytes());
        f.extend((16_000 * u32::from(channels * bits / 8)).to_le_bytes());
        f.extend((channels * bits / 8).to_le_bytes());
        f.extend(bits.to_le_bytes());
        f.extend(cb.to_le_bytes());
        f.extend(valid.to_le_bytes());
        f.extend(mask.to_le_bytes());
        f.extend(sub_format.to_le_bytes());
        f.extend([0, 0]);
        f.extend(SUBTYPE_GUID_TAIL);
        f.resize(size, 0x55);
        f
    }

    /// Extensible fmt chunks symphonia 0.5 refuses and ffmpeg reads (cbSize above 22, a
    /// channel mask with unknown positions or too few for the channels, valid bits above the
    /// width, float valid bits other than the width, the mu-law GUID) are read as the plain
    /// format the GUID names: its tag, the 16 fields as written and cbSize 0. The ones
    /// symphonia reads, and the ones ffmpeg refuses too (cbSize under 22, an unknown
    /// sub-format), are left alone.
    #[test]
    fn extensible_fmt_chunks_symphonia_refuses_are_read_as_their_plain_format() {
        let samples = [0x11u8, 0x22, 0x33, 0x44];
        for (what, fmt, plain_tag) in [
            ("cbSize 24", extensible_fmt(2, 16, 24, 16, 3, 1, 42), 1u16),
            (
                "SPEAKER_ALL",
                extensible_fmt(2, 16, 22, 16, 0x8000_0000, 1, 40),
                1,
            ),
            (
                "reserved bits",
                extensible_fmt(1, 16, 22, 16, 0x0400_0000, 1, 40),
                1,
            ),
            // Two positions added above bit 25: past LFE2.
            (
                "mask too short",
                extensible_fmt(3, 16, 22, 16, 0x0200_0000, 1, 40),
                1,
            ),
            (
                "valid bits 20 of 16",
                extensible_fmt(1, 16, 22, 20, 4, 1, 40),
                1,
            ),
            (
                "float valid 24 of 32",
                extensible_fmt(1, 32, 22, 24, 4, 3, 40),
                3,
            ),
            ("mu-law", extensible_fmt(1, 8, 22, 8, 4, 7, 40), 7),
            (
                "A-law, odd cbSize",
                extensible_fmt(1, 8, 23, 8, 4, 6, 41),
                6,
            ),
        ] {
            let mut body = fmt.clone();
            if body.len() % 2 == 1 {
                body.push(0);
            }
            let file = riff(&[(b"fmt ", fmt.len() as u32, &body), (b"data", 4, &samples)]);
            let got = corrected(&file).unwrap_or_else(|| panic!("{what}: not corrected"));
            let plain_fields = [&plain_tag.to_le_bytes()[..], &fmt[2..16], &[0, 0]].concat();
            let mut want = riff(&[(b"fmt ", 18, &plain_fields), (b"data", 4, &samples)]);
            let written = u32::from_le_bytes(file[4..8].try_into().unwrap());
            let moved = written as i64 + want.len() as i64 - file.len() as i64;
            want[4..8].copy_from_slice(&(moved as u32).to_le_bytes());
            assert_eq!(got, want, "{what}");
        }
        for (what, fmt) in [
            ("stereo PCM", extensible_fmt(2, 16, 22, 16, 3, 1, 40)),
            ("mask 0", extensible_fmt(2, 24, 22, 20, 0, 1, 40)),
            (
                "mask with too many",
                extensible_fmt(1, 16, 22, 16, 0x3F, 1, 40),
            ),
            ("A-law", extensible_fmt(1, 8, 22, 8, 4, 6, 40)),
            ("float", extensible_fmt(1, 32, 22, 32, 4, 3, 40)),
            ("a longer chunk", extensible_fmt(1, 16, 22, 16, 4, 1, 44)),
            ("cbSize 0", extensible_fmt(2, 16, 0, 16, 0x8000_0000, 1, 40)),
            (
                "ADPCM sub-format",
                extensible_fmt(1, 4, 24, 4, 0x8000_0000, 2, 42),
            ),
            ("short", extensible_fmt(1, 16, 22, 16, 0x8000_0000, 1, 38)),
        ] {
            let file = riff(&[(b"fmt ", fmt.len() as u32, &fmt), (b"data", 4, &samples)]);
            assert_eq!(corrected(&file), None, "{what}");
        }
        // The unknown-GUID check looks at the whole GUID.
        let mut odd_guid = extensible_fmt(1, 16, 22, 16, 0x8000_0000, 1, 40);
        odd_guid[39] ^= 1;
        let file = riff(&[(b"fmt ", 40, &odd_guid), (b"data", 4, &samples)]);
        assert_eq!(corrected(&file), None, "a GUID of another family");
    }

    /// Block alignment 0 and bits per sample symphonia has no decoder for are read as
    /// ffmpeg reads them, from each other; fields that are fine, or contradict each other,
    /// or leave both unknown, are left alone.
    #[test]
    fn frame_fields_are_read_from_each_other_where_one_is_unusable() {
        let read = frame_fields_as_ffmpeg_reads_them;
        let (pcm, float, mulaw, adpcm) = (1, 3, 7, 0x11);
        // (format, extensible, channels, block align, bits) -> what is read
        for (fields, want) in [
            ((pcm, false, 1, 2, 16), None),
            ((pcm, false, 2, 0, 16), Some((4, 16))),
            ((pcm, false, 1, 0, 8), Some((1, 8))),
            ((pcm, false, 1, 2, 12), Some((2, 16))),
            ((pcm, false, 2, 6, 20), Some((6, 24))),
            ((pcm, false, 1, 0, 12), Some((2, 16))),
            ((pcm, true, 2, 8, 0), Some((8, 32))),
            ((pcm, true, 1, 4, 255), Some((4, 32))),
            ((float, false, 1, 0, 32), Some((4, 32))),
            ((float, true, 2, 16, 0), Some((16, 64))),
            ((mulaw, false, 1, 0, 8), Some((1, 8))),
            ((mulaw, false, 1, 0, 0), Some((1, 0))),
            // Contradictions and unknowns: for the decoder to report. A plain chunk's bits
            // of 0 or past 64 name no decoder, for ffmpeg either.
            ((pcm, false, 2, 8, 0), None),
            ((pcm, false, 1, 4, 255), None),
            ((float, false, 2, 16, 0), None),
            ((pcm, false, 1, 3, 12), None),
            ((pcm, true, 1, 0, 0), None),
            ((pcm, true, 1, 5, 0), None),
            ((pcm, true, 2, 3, 0), None),
            ((pcm, false, 0, 0, 16), None),
            ((pcm, false, 1, 0, 40), None),
            ((float, false, 1, 2, 16), None),
            ((adpcm, false, 1, 0, 4), None),
            // A wrong but usable block alignment is left as written (ffmpeg too reads by it).
            ((pcm, false, 1, 4, 16), None),
        ] {
            let (format, extensible, channels, align, bits) = fields;
            assert_eq!(
                read(format, extensible, channels, align, bits),
                want,
                "{fields:?}"
            );
        }
        // In a file: the fields patched in place, for a plain and an extensible chunk.
        let samples = [0x11u8, 0x22, 0x33, 0x44];
        let mut fmt = vec![1u8, 0, 1, 0, 0x80, 0x3E, 0, 0, 0, 0x7D, 0, 0];
        fmt.extend([0, 0, 16, 0]);
        let file = riff(&[(b"fmt ", 16, &fmt), (b"data", 4, &samples)]);
        let got = corrected(&file).expect("block alignment 0 corrected");
        assert_eq!(&got[32..36], &[2, 0, 16, 0]);
        assert_eq!(got.len(), file.len());
        let mut ext = extensible_fmt(1, 16, 22, 16, 4, 1, 40);
        ext[14..16].copy_from_slice(&0u16.to_le_bytes());
        let file = riff(&[(b"fmt ", 40, &ext), (b"data", 4, &samples)]);
        let got = corrected(&file).expect("extensible with 0 bits corrected");
        assert_eq!(&got[32..36], &[2, 0, 16, 0]);
        assert_eq!(
            &got[20..22],
            &[0xFE, 0xFF],
            "still extensible: symphonia reads it so"
        );
    }

    /// A LIST of INFO tags one of whose tags runs past the LIST's end is renamed JUNK (an id
    /// symphonia skips whole); INFO lists whose tags fit, other LIST forms and LIST chunks
    /// past the file's end are left alone.
    #[test]
    fn info_tags_that_overrun_their_list_get_the_list_skipped() {
        let fmt = [0u8; 16];
        let pcm = [3u8; 8];
        let list = |tags: &[u8], form: &[u8; 4]| [&form[..], tags].concat();
        for (tags, form, skipped) in [
            (&b"INAM\x40\0\0\0speech"[..], b"INFO", true),
            (b"ISFT\x02\0\0\0abINAM\x07\0\0\0speech", b"INFO", true),
            (b"INAM\x06\0\0\0speech", b"INFO", false),
            (b"INAM\x40\0\0\0speech", b"adtl", false),
            // Fewer than a header's bytes after the last tag: symphonia stops there.
            (b"INAM\x02\0\0\0abxyz", b"INFO", false),
        ] {
            let body = list(tags, form);
            let file = riff(&[
                (b"fmt ", 16, &fmt),
                (b"LIST", body.len() as u32, &body),
                (b"data", 8, &pcm),
            ]);
            let got = corrected(&file);
            if skipped {
                let got = got.expect("corrected");
                assert_eq!(&got[36..40], b"JUNK");
                assert_eq!(&got[..36], &file[..36]);
                assert_eq!(&got[40..], &file[40..]);
            } else {
                assert_eq!(got, None, "{:?}", String::from_utf8_lossy(tags));
            }
        }
        // A LIST that runs past the file's end is the decoder's to report.
        let body = list(b"INAM\x40\0\0\0speech", b"INFO");
        let mut cut = riff(&[(b"fmt ", 16, &fmt), (b"LIST", 400, &body)]);
        cut[4..8].copy_from_slice(&(8u32 + 400).to_le_bytes());
        assert!(corrected(&cut).is_none_or(|got| &got[36..40] == b"LIST"));
    }

    #[test]
    fn symphonia_s_channel_mask_arithmetic() {
        assert_eq!(symphonia_channel_mask(0, 2), Some(3));
        assert_eq!(symphonia_channel_mask(0b100, 3), Some(0b11100));
        assert_eq!(symphonia_channel_mask(0b1011, 2), Some(0b11));
        assert_eq!(symphonia_channel_mask(0x8000_0000, 2), None);
        assert_eq!(symphonia_channel_mask(0x4000_0000, 3), None);
        assert_eq!(symphonia_channel_mask(0, 32), None);
    }

    #[test]
    fn patches_apply_across_reads_and_seeks() {
        let file: Vec<u8> = (0..=255u8).collect();
        let patches = vec![Patch {
            offset: 10,
            bytes: vec![0xAA; 4],
        }];
        let mut want = file.clone();
        want[10..14].fill(0xAA);
        let fix = Corrections {
            patches,
            splice: None,
            what: String::new(),
        };
        let mut src = PatchedSource::new(Box::new(Cursor::new(file)), fix);
        let mut got: Vec<u8> = Vec::new();
        let mut small = [0u8; 3]; // reads that split the patch
        loop {
            let n = src.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            got.extend(&small[..n]);
        }
        assert_eq!(got, want);
        for (to, at) in [
            (SeekFrom::Start(12), 12usize),
            (SeekFrom::End(-3), 253),
            (SeekFrom::Start(8), 8),
        ] {
            src.seek(to).unwrap();
            let mut b = [0u8; 8];
            let n = src.read(&mut b).unwrap();
            assert_eq!(&b[..n], &want[at..at + n], "after {to:?}");
        }
    }
}
