//! A SoundFont 2 reader: the RIFF chunk tree, the preset/instrument/sample hierarchy
//! (`pdta`) and where the 16-bit sample data (`sdta/smpl`) lies in the file. Sample points
//! are read on demand, so a 150 MB file costs only its ~200 KB of headers in memory.
//! Every size and index is checked against what the file holds: a damaged file is an error
//! naming the chunk, preset, instrument or sample, never a panic or an out-of-range read.

use std::io::{Read, Seek, SeekFrom};

/// Generator operators used here (SoundFont 2.04, section 8.1.2).
const GEN_KEY_RANGE: u16 = 43;
const GEN_INSTRUMENT: u16 = 41;
const GEN_SAMPLE_MODES: u16 = 54;
const GEN_SAMPLE_ID: u16 = 53;
const GEN_OVERRIDING_ROOT_KEY: u16 = 58;

/// Sample types (section 7.10): ROM samples have no data in the file.
const SAMPLE_RIGHT: u16 = 2;
const SAMPLE_LEFT: u16 = 4;
const SAMPLE_ROM: u16 = 0x8000;

#[derive(Debug, Clone, PartialEq)]
pub struct SampleHeader {
    pub name: String,
    /// Sample points, relative to the start of the `smpl` data; `end` is exclusive.
    pub start: u32,
    pub end: u32,
    pub loop_start: u32,
    pub loop_end: u32,
    pub sample_rate: u32,
    pub original_pitch: u8,
    pub link: u16,
    pub kind: u16,
}

impl SampleHeader {
    pub fn is_rom(&self) -> bool {
        self.kind & SAMPLE_ROM != 0
    }
    pub fn is_right(&self) -> bool {
        self.kind & SAMPLE_RIGHT != 0
    }
    pub fn is_left(&self) -> bool {
        self.kind & SAMPLE_LEFT != 0
    }
    /// A loop inside the sample with at least a few points in it.
    pub fn has_valid_loop(&self) -> bool {
        self.loop_start >= self.start
            && self.loop_end <= self.end
            && self.loop_end >= self.loop_start + 8
    }
}

/// One instrument zone's sample as a preset plays it.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub sample: usize,
    /// The MIDI key at which the sample sounds at its recorded pitch.
    pub root_key: u8,
    /// 1 or 3: the loop is played while the note is held.
    pub loops: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    pub bank: u16,
    pub program: u16,
    pub zones: Vec<Zone>,
}

#[derive(Debug)]
pub struct SoundFont {
    pub presets: Vec<Preset>,
    pub samples: Vec<SampleHeader>,
    /// Byte offset of the first sample point in the file, and the number of points.
    pub data_offset: u64,
    pub data_points: u64,
}

struct Chunk {
    id: [u8; 4],
    /// Byte offset of the chunk's data, and its size.
    offset: u64,
    size: u64,
}

fn fourcc(id: &[u8; 4]) -> String {
    id.iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

fn read_exact_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> Result<(), String> {
    r.seek(SeekFrom::Start(offset))
        .and_then(|_| r.read_exact(buf))
        .map_err(|e| format!("reading {} bytes at offset {offset}: {e}", buf.len()))
}

/// The chunks inside `[start, end)`, each checked to fit.
fn chunks_in<R: Read + Seek>(r: &mut R, start: u64, end: u64) -> Result<Vec<Chunk>, String> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos + 8 <= end {
        let mut head = [0u8; 8];
        read_exact_at(r, pos, &mut head)?;
        let id = [head[0], head[1], head[2], head[3]];
        let size = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64;
        let offset = pos + 8;
        if offset + size > end {
            return Err(format!(
                "truncated chunk '{}' at offset {pos}: it declares {size} bytes, only {} remain",
                fourcc(&id),
                end - offset
            ));
        }
        out.push(Chunk { id, offset, size });
        pos = offset + size + (size & 1);
    }
    Ok(out)
}

/// The sub-chunks of the `LIST` chunk of type `kind`.
fn list<R: Read + Seek>(r: &mut R, top: &[Chunk], kind: &[u8; 4]) -> Result<Vec<Chunk>, String> {
    for c in top.iter().filter(|c| &c.id == b"LIST" && c.size >= 4) {
        let mut t = [0u8; 4];
        read_exact_at(r, c.offset, &mut t)?;
        if &t == kind {
            return chunks_in(r, c.offset + 4, c.offset + c.size);
        }
    }
    Err(format!("no LIST '{}' chunk", fourcc(kind)))
}

/// The records of the `pdta` sub-chunk `id`, `size` bytes each, at least `min` of them.
fn records<R: Read + Seek>(
    r: &mut R,
    pdta: &[Chunk],
    id: &[u8; 4],
    size: usize,
    min: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let c = pdta
        .iter()
        .find(|c| &c.id == id)
        .ok_or_else(|| format!("no '{}' chunk in pdta", fourcc(id)))?;
    if c.size % size as u64 != 0 {
        return Err(format!(
            "chunk '{}' is {} bytes, not a whole number of {size}-byte records",
            fourcc(id),
            c.size
        ));
    }
    let mut buf = vec![0u8; c.size as usize];
    read_exact_at(r, c.offset, &mut buf)?;
    let out: Vec<Vec<u8>> = buf.chunks(size).map(<[u8]>::to_vec).collect();
    if out.len() < min {
        return Err(format!(
            "chunk '{}' has {} records, at least {min} needed (with the terminal one)",
            fourcc(id),
            out.len()
        ));
    }
    Ok(out)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn name_at(b: &[u8]) -> String {
    let raw = &b[..20];
    let end = raw.iter().position(|&c| c == 0).unwrap_or(20);
    String::from_utf8_lossy(&raw[..end])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A generator: operator and its two amount bytes.
type Generator = (u16, [u8; 2]);

/// The name of header record `w[0]` (a preset or an instrument; its zones run to those of
/// the next record, `w[1]`, whose bag index is at byte `bag_field`) and the generators of
/// each of its zones, the global zone's merged into the others; `terminal` is the generator
/// that ends a non-global zone.
fn record_zones(
    what: &str,
    w: &[Vec<u8>],
    bag_field: usize,
    bag: &[(usize, usize)],
    gens: &[Generator],
    terminal: u16,
) -> Result<(String, Vec<Vec<Generator>>), String> {
    let name = name_at(&w[0]);
    let (first, end) = (
        u16_at(&w[0], bag_field) as usize,
        u16_at(&w[1], bag_field) as usize,
    );
    if first > end || end + 1 > bag.len() {
        return Err(format!(
            "{what} '{name}': zones {first}..{end} out of range ({} in the file)",
            bag.len().saturating_sub(1)
        ));
    }
    let mut global: Vec<Generator> = Vec::new();
    let mut out = Vec::new();
    for (i, b) in (first..end).enumerate() {
        let (from, to) = (bag[b].0, bag[b + 1].0);
        if from > to || to > gens.len() {
            return Err(format!(
                "{what} '{name}': zone {i} has generators {from}..{to}, out of range ({})",
                gens.len()
            ));
        }
        let own = &gens[from..to];
        if own.iter().any(|g| g.0 == terminal) {
            let mut merged = global.clone();
            merged.extend_from_slice(own);
            out.push(merged);
        } else if i == 0 {
            global = own.to_vec();
        }
    }
    Ok((name, out))
}

fn bag_table(recs: &[Vec<u8>]) -> Vec<(usize, usize)> {
    recs.iter()
        .map(|r| (u16_at(r, 0) as usize, u16_at(r, 2) as usize))
        .collect()
}

fn gen_table(recs: &[Vec<u8>]) -> Vec<Generator> {
    recs.iter().map(|r| (u16_at(r, 0), [r[2], r[3]])).collect()
}

fn last(gens: &[Generator], op: u16) -> Option<[u8; 2]> {
    gens.iter().rev().find(|g| g.0 == op).map(|g| g.1)
}

impl SoundFont {
    /// Reads the headers of the SoundFont `r` (`len` bytes long).
    pub fn read<R: Read + Seek>(r: &mut R, len: u64) -> Result<Self, String> {
        let mut head = [0u8; 12];
        if len < 12 {
            return Err(format!("{len} bytes: too short for a RIFF header"));
        }
        read_exact_at(r, 0, &mut head)?;
        if &head[0..4] != b"RIFF" || &head[8..12] != b"sfbk" {
            return Err("not a SoundFont 2 file (no RIFF 'sfbk' header)".into());
        }
        let riff_size = u32_at(&head, 4) as u64;
        if 8 + riff_size > len {
            return Err(format!(
                "truncated file: the RIFF header declares {} bytes, the file has {len}",
                8 + riff_size
            ));
        }
        let top = chunks_in(r, 12, 8 + riff_size)?;
        let sdta = list(r, &top, b"sdta")?;
        let smpl = sdta
            .iter()
            .find(|c| &c.id == b"smpl")
            .ok_or("no 'smpl' chunk in sdta (no sample data)")?;
        let pdta = list(r, &top, b"pdta")?;

        let phdr = records(r, &pdta, b"phdr", 38, 2)?;
        let pbag = bag_table(&records(r, &pdta, b"pbag", 4, 1)?);
        let pgen = gen_table(&records(r, &pdta, b"pgen", 4, 1)?);
        let inst = records(r, &pdta, b"inst", 22, 2)?;
        let ibag = bag_table(&records(r, &pdta, b"ibag", 4, 1)?);
        let igen = gen_table(&records(r, &pdta, b"igen", 4, 1)?);
        let shdr = records(r, &pdta, b"shdr", 46, 1)?;

        let data_points = smpl.size / 2;
        // The last sample header is the terminal "EOS" record.
        let samples: Vec<SampleHeader> = shdr[..shdr.len() - 1]
            .iter()
            .map(|s| SampleHeader {
                name: name_at(s),
                start: u32_at(s, 20),
                end: u32_at(s, 24),
                loop_start: u32_at(s, 28),
                loop_end: u32_at(s, 32),
                sample_rate: u32_at(s, 36),
                original_pitch: s[40],
                link: u16_at(s, 42),
                kind: u16_at(s, 44),
            })
            .collect();

        let mut instruments: Vec<Vec<Zone>> = Vec::new();
        for w in inst.windows(2) {
            let (name, zones) = record_zones("instrument", w, 20, &ibag, &igen, GEN_SAMPLE_ID)?;
            let mut out = Vec::new();
            for z in zones {
                let id = u16::from_le_bytes(last(&z, GEN_SAMPLE_ID).unwrap()) as usize;
                let s = samples.get(id).ok_or_else(|| {
                    format!(
                        "instrument '{name}': sample {id} does not exist ({} in the file)",
                        samples.len()
                    )
                })?;
                let root = last(&z, GEN_OVERRIDING_ROOT_KEY)
                    .map(i16::from_le_bytes)
                    .filter(|k| (0..=127).contains(k))
                    .map(|k| k as u8)
                    .unwrap_or(s.original_pitch.min(127));
                let mode = last(&z, GEN_SAMPLE_MODES).map_or(0, u16::from_le_bytes) & 3;
                // A zone restricted to an empty key range is never played.
                if last(&z, GEN_KEY_RANGE).is_some_and(|k| k[0] > k[1]) {
                    continue;
                }
                out.push(Zone {
                    sample: id,
                    root_key: root,
                    loops: mode == 1 || mode == 3,
                });
            }
            instruments.push(out);
        }

        let mut presets = Vec::new();
        for w in phdr.windows(2) {
            let (name, zones) = record_zones("preset", w, 24, &pbag, &pgen, GEN_INSTRUMENT)?;
            let mut preset_zones = Vec::new();
            for z in zones {
                let id = u16::from_le_bytes(last(&z, GEN_INSTRUMENT).unwrap()) as usize;
                let zs = instruments.get(id).ok_or_else(|| {
                    format!(
                        "preset '{name}': instrument {id} does not exist ({} in the file)",
                        instruments.len()
                    )
                })?;
                preset_zones.extend(zs.iter().cloned());
            }
            presets.push(Preset {
                name,
                program: u16_at(&w[0], 20),
                bank: u16_at(&w[0], 22),
                zones: preset_zones,
            });
        }
        Ok(SoundFont {
            presets,
            samples,
            data_offset: smpl.offset,
            data_points,
        })
    }

    /// Checks that sample `id` has data inside the file.
    pub fn check_sample(&self, id: usize) -> Result<(), String> {
        let s = &self.samples[id];
        if s.end <= s.start {
            return Err(format!(
                "sample '{}' is empty (start {} >= end {})",
                s.name, s.start, s.end
            ));
        }
        if s.end as u64 > self.data_points {
            return Err(format!(
                "sample '{}' ends at point {}, past the {} points of sample data",
                s.name, s.end, self.data_points
            ));
        }
        if s.sample_rate == 0 || s.sample_rate > 192_000 {
            return Err(format!(
                "sample '{}' has sample rate {} Hz",
                s.name, s.sample_rate
            ));
        }
        Ok(())
    }

    /// The points of sample `id` (checked with [`Self::check_sample`] first).
    pub fn read_points<R: Read + Seek>(&self, r: &mut R, id: usize) -> Result<Vec<i16>, String> {
        self.check_sample(id)?;
        let s = &self.samples[id];
        let n = (s.end - s.start) as usize;
        let mut bytes = vec![0u8; n * 2];
        read_exact_at(r, self.data_offset + s.start as u64 * 2, &mut bytes)
            .map_err(|e| format!("sample '{}': {e}", s.name))?;
        Ok(bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect())
    }
}
