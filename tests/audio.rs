//! Decoding and resampling against the oracle (PyAV / sox) and between formats.

use earshot::audio::{self, AudioError, Segment};
use earshot_tests::*;

fn reference_speech() -> Vec<f32> {
    let (shape, data) = read_npy(&whisper_oracle("expected/a_speech_wave_f32.npy"));
    assert_eq!(shape, vec![46536]);
    data
}

fn load(p: &std::path::Path) -> Vec<f32> {
    audio::load_16k_mono(p, Segment::whole()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn wav_s16_equals_reference() {
    let got = load(&whisper_oracle("audio/a_speech_16k.wav"));
    assert_eq!(got, reference_speech());
}

#[test]
fn flac_decodes_bit_identical_to_wav() {
    let wav = load(&whisper_oracle("audio/a_speech_16k.wav"));
    let flac = load(&whisper_oracle("audio/a_speech_16k.flac"));
    assert_eq!(wav, flac);
    let (_, oracle) = read_npy(&whisper_oracle("expected/decoded_a_speech_16k_flac.npy"));
    assert_eq!(flac, oracle);
}

/// The oracle's speech WAV: its bytes, where its data chunk starts and the samples' size.
fn oracle_speech_wav() -> (Vec<u8>, usize, usize) {
    let original = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let data = original
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk");
    let size = u32::from_le_bytes(original[data + 4..data + 8].try_into().unwrap()) as usize;
    (original, data, size)
}

/// A WAV written to a pipe (`ffmpeg ... -f wav -`, `arecord`) has its RIFF and data sizes
/// left at a placeholder, 0xFFFFFFFF or 0, meaning "to the end of the file": the oracle's
/// speech written so decodes to the reference, from a file and from bytes in memory.
#[test]
fn wav_written_to_a_pipe_reads_to_the_end() {
    let (original, data, size) = oracle_speech_wav();
    // What a pipe writer leaves: the header up to the data chunk, then the samples to the end.
    let samples = &original[data + 8..data + 8 + size];
    let dir = tempfile::tempdir().unwrap();
    for placeholder in [u32::MAX, 0] {
        let mut streamed = original[..data + 8].to_vec();
        streamed[4..8].copy_from_slice(&placeholder.to_le_bytes());
        streamed[data + 4..data + 8].copy_from_slice(&placeholder.to_le_bytes());
        streamed.extend_from_slice(samples);
        let path = dir.path().join(format!("piped_{placeholder:x}.wav"));
        std::fs::write(&path, &streamed).unwrap();
        assert_eq!(load(&path), reference_speech(), "{placeholder:#x}");
        let from_bytes = audio::decode_file_mono(streamed, &path, Segment::whole(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_bytes.samples.len(), reference_speech().len());
    }
}

/// A LIST chunk of INFO tags whose size stops one byte short, before the pad of its last,
/// odd subchunk (the pad sits where the outer walk pads an odd chunk anyway): ffmpeg and
/// libsndfile read such a WAV; symphonia 0.5 refuses all of it ("chunk length exceeds
/// parent"). The oracle's speech with such a LIST before or after its data chunk, and with
/// a data size left at a pipe's placeholder, decodes to the reference.
#[test]
fn a_wav_list_chunk_one_byte_short_of_its_pad_still_decodes() {
    let (original, data, size) = oracle_speech_wav();
    let (header, samples) = (&original[12..data], &original[data + 8..data + 8 + size]);
    // INFO: a 6-byte title (even), then a 5-byte software tag (odd) last, padded after it.
    let mut list = b"INFO".to_vec();
    list.extend(b"INAM\x06\0\0\0speech");
    list.extend(b"ISFT\x05\0\0\0abcd\0");
    let short = list.len() as u32; // without the last pad
    list.push(0);
    let chunk = |id: &[u8], size: u32, body: &[u8]| {
        let mut c = id.to_vec();
        c.extend(size.to_le_bytes());
        c.extend(body);
        c
    };
    let riff = |body: Vec<u8>, riff_size: Option<u32>| {
        let mut w = b"RIFF".to_vec();
        w.extend(riff_size.unwrap_or(body.len() as u32 + 4).to_le_bytes());
        w.extend(b"WAVE");
        w.extend(body);
        w
    };
    let list_chunk = chunk(b"LIST", short, &list);
    let data_chunk = chunk(b"data", size as u32, samples);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "before-data",
            riff([header, &list_chunk, &data_chunk].concat(), None),
        ),
        (
            "after-data",
            riff([header, &data_chunk, &list_chunk].concat(), None),
        ),
        (
            "before-piped-data",
            riff(
                [header, &list_chunk, &chunk(b"data", u32::MAX, samples)].concat(),
                Some(u32::MAX),
            ),
        ),
    ];
    for (name, file) in cases {
        let path = dir.path().join(format!("{name}.wav"));
        std::fs::write(&path, &file).unwrap();
        assert_eq!(load(&path), reference_speech(), "{name}");
        let from_bytes = audio::decode_file_mono(file, &path, Segment::whole(), None)
            .unwrap_or_else(|e| panic!("{name} from bytes: {e}"));
        assert_eq!(from_bytes.samples, reference_speech(), "{name} from bytes");
    }
    // The same LIST with its size right decodes as before.
    let right = chunk(b"LIST", short + 1, &list);
    let path = dir.path().join("right.wav");
    std::fs::write(&path, riff([header, &right, &data_chunk].concat(), None)).unwrap();
    assert_eq!(load(&path), reference_speech());
}

/// A LIST chunk of INFO tags one of whose tags claims more bytes than the LIST holds (a
/// writer that miscounted): symphonia 0.5 refused the whole file ("chunk length exceeds
/// parent"), ffmpeg warns and stops reading the tags. The oracle's speech with such a LIST
/// before or after its data, and piped, decodes to the reference (the tags are dropped).
#[test]
fn a_wav_whose_info_tags_overrun_their_list_still_decodes() {
    let (original, data, size) = oracle_speech_wav();
    let (header, samples) = (&original[12..data], &original[data + 8..data + 8 + size]);
    let chunk = |id: &[u8], size: u32, body: &[u8]| {
        let mut c = id.to_vec();
        c.extend(size.to_le_bytes());
        c.extend(body);
        if body.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let riff = |body: Vec<u8>, riff_size: Option<u32>| {
        let mut w = b"RIFF".to_vec();
        w.extend(riff_size.unwrap_or(body.len() as u32 + 4).to_le_bytes());
        w.extend(b"WAVE");
        w.extend(body);
        w
    };
    let dir = tempfile::tempdir().unwrap();
    // A title whose size says 64 where it holds 6, first and last in the list.
    for (where_, tags) in [
        (
            "first",
            [&b"INAM\x40\0\0\0speech"[..], b"ISFT\x04\0\0\0abcd"].concat(),
        ),
        (
            "last",
            [&b"ISFT\x04\0\0\0abcd"[..], b"INAM\x40\0\0\0speech"].concat(),
        ),
    ] {
        let list = chunk(
            b"LIST",
            4 + tags.len() as u32,
            &[&b"INFO"[..], &tags].concat(),
        );
        let data_chunk = chunk(b"data", size as u32, samples);
        for (name, file) in [
            (
                "before-data",
                riff([header, &list, &data_chunk].concat(), None),
            ),
            (
                "after-data",
                riff([header, &data_chunk, &list].concat(), None),
            ),
            (
                "before-piped-data",
                riff(
                    [header, &list, &chunk(b"data", u32::MAX, samples)].concat(),
                    Some(u32::MAX),
                ),
            ),
        ] {
            let path = dir.path().join(format!("{where_}-{name}.wav"));
            std::fs::write(&path, &file).unwrap();
            assert_eq!(load(&path), reference_speech(), "{where_} {name}");
        }
    }
}

/// G.711 (ITU-T, as Sun's reference g711.c encodes it): a 16-bit sample as one A-law byte.
fn linear_to_alaw(sample: i16) -> u8 {
    const END: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];
    let mut v = i32::from(sample) >> 3;
    let mask = if v >= 0 {
        0xD5
    } else {
        v = -v - 1;
        0x55
    };
    let Some(seg) = END.iter().position(|&e| v <= e) else {
        return 0x7F ^ mask;
    };
    let quant = if seg < 2 { v >> 1 } else { v >> seg } & 0xF;
    (((seg as i32) << 4) | quant) as u8 ^ mask
}

/// The same for mu-law.
fn linear_to_mulaw(sample: i16) -> u8 {
    const END: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
    let mut v = i32::from(sample) >> 2;
    let mask = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    v = v.min(8159) + 0x21;
    let Some(seg) = END.iter().position(|&e| v <= e) else {
        return 0x7F ^ mask;
    };
    (((seg as i32) << 4) | ((v >> (seg + 1)) & 0xF)) as u8 ^ mask
}

/// A G.711 WAV whose fmt chunk leaves out cbSize (16 bytes, as for PCM), as writers that
/// treat G.711 like PCM write it: symphonia 0.5 refused it ("malformed fmt_mulaw chunk");
/// ffmpeg and libsndfile read it. The oracle's speech in mu-law and A-law so written decodes
/// to the same samples as the same bytes with an 18-byte fmt chunk (which symphonia reads
/// itself), close to the reference; so do a segment (a seek through the corrected header)
/// and the same file with its sizes left at a pipe's placeholder.
#[test]
fn g711_wav_without_cb_size_decodes() {
    let reference = reference_speech();
    let pcm: Vec<i16> = reference
        .iter()
        .map(|&v| (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for (tag, name, encode) in [
        (6u16, "alaw", linear_to_alaw as fn(i16) -> u8),
        (7, "mulaw", linear_to_mulaw),
    ] {
        let data: Vec<u8> = pcm.iter().map(|&s| encode(s)).collect();
        let wav = |cb_size: bool, sizes: Option<u32>| {
            let mut fmt = tag.to_le_bytes().to_vec();
            fmt.extend(1u16.to_le_bytes()); // mono
            fmt.extend(16_000u32.to_le_bytes());
            fmt.extend(16_000u32.to_le_bytes()); // bytes a second
            fmt.extend(1u16.to_le_bytes()); // block align
            fmt.extend(8u16.to_le_bytes());
            if cb_size {
                fmt.extend(0u16.to_le_bytes());
            }
            let mut body = b"WAVEfmt ".to_vec();
            body.extend((fmt.len() as u32).to_le_bytes());
            body.extend(&fmt);
            body.extend(b"data");
            body.extend(sizes.unwrap_or(data.len() as u32).to_le_bytes());
            body.extend(&data);
            let mut w = b"RIFF".to_vec();
            w.extend(sizes.unwrap_or(body.len() as u32).to_le_bytes());
            w.extend(body);
            w
        };
        let write = |file: &str, bytes: Vec<u8>| {
            let path = dir.path().join(file);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let standard = load(&write(&format!("{name}_18.wav"), wav(true, None)));
        assert_eq!(standard.len(), reference.len(), "{name}");
        assert!(snr_db(&standard, &reference) > 30.0, "{name}: G.711 itself");
        let short = write(&format!("{name}_16.wav"), wav(false, None));
        assert_eq!(load(&short), standard, "{name}: 16-byte fmt");
        let seg = audio::load_16k_mono(
            &short,
            Segment {
                start: Some(1.0),
                end: Some(2.0),
            },
        )
        .unwrap_or_else(|e| panic!("{name} segment: {e}"));
        assert_eq!(seg, standard[16000..32000], "{name}: segment");
        for placeholder in [0, u32::MAX] {
            let piped = write(
                &format!("{name}_16_piped_{placeholder:x}.wav"),
                wav(false, Some(placeholder)),
            );
            assert_eq!(load(&piped), standard, "{name}: piped {placeholder:#x}");
        }
    }
}

/// A WAV whose RIFF size is a placeholder (0, 0xFFFFFFFF) while its data size is real, or
/// too small for its data chunk, decodes to the plain file's samples (ffmpeg reads the
/// chunks; symphonia alone finds no data chunk or refuses the file), and such a file cut
/// short is still reported as truncated.
#[test]
fn a_wav_whose_riff_size_misstates_its_chunks_decodes_to_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let plain = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let want = reference_speech();
    let len = plain.len() as u32;
    for riff in [0u32, u32::MAX, len - 8 - 7, 4] {
        let mut file = plain.clone();
        file[4..8].copy_from_slice(&riff.to_le_bytes());
        let p = dir.path().join(format!("riff_{riff:x}.wav"));
        std::fs::write(&p, &file).unwrap();
        assert_eq!(load(&p), want, "RIFF size {riff:#x}");
        let cut = dir.path().join(format!("riff_{riff:x}_cut.wav"));
        std::fs::write(&cut, &file[..file.len() / 2]).unwrap();
        let err = audio::load_16k_mono(&cut, Segment::whole())
            .expect_err("a file cut in half")
            .to_string();
        assert!(err.contains("truncated"), "RIFF size {riff:#x}, cut: {err}");
    }
}

/// A WAV file's bytes with its fmt chunk replaced by its 16 fields followed by `extra`
/// (cbSize and extension bytes as some writers leave them), padded when odd, and the RIFF
/// size as `riff` gives it (`None`: the file's new length less 8).
fn with_fmt_extra(wav: &[u8], extra: &[u8], riff: Option<u32>) -> Vec<u8> {
    assert_eq!(&wav[12..16], b"fmt ", "a fmt chunk first");
    let size = u32::from_le_bytes(wav[16..20].try_into().unwrap()) as usize;
    let rest = &wav[20 + size + (size & 1)..];
    let mut out = wav[..16].to_vec();
    out.extend(((16 + extra.len()) as u32).to_le_bytes());
    out.extend(&wav[20..36]);
    out.extend(extra);
    if extra.len() % 2 == 1 {
        out.push(0);
    }
    out.extend(rest);
    let riff = riff.unwrap_or(out.len() as u32 - 8);
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    out
}

/// PCM and IEEE float WAV whose fmt chunk has bytes after its fields that these formats do
/// not use (a 20-byte PCM fmt chunk, an odd one, an IEEE one whose cbSize is not 0), which
/// ffmpeg reads and symphonia alone refuses, decode to the samples of the plain file; so
/// do such files written to a pipe (sizes left at a placeholder) and with a chunk after the
/// data.
#[test]
fn wav_fmt_chunks_with_extension_bytes_decode_to_the_plain_file_s_samples() {
    let dir = tempfile::tempdir().unwrap();
    let pcm = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let float = std::fs::read(fixture("audio/speech_f32.wav")).unwrap();
    let list = b"LIST\x10\0\0\0INFOINAM\x03\0\0\0ab\0\0";
    for (name, plain, extra) in [
        ("pcm_20", &pcm, vec![2u8, 0, 0xAB, 0xCD]),
        ("pcm_17", &pcm, vec![0x7F]),
        ("pcm_24", &pcm, vec![6, 0, 1, 2, 3, 4, 5, 6]),
        ("float_18_cb5", &float, vec![5, 0]),
        ("float_20", &float, vec![2, 0, 9, 9]),
    ] {
        let want = load(&{
            let p = dir.path().join(format!("{name}_plain.wav"));
            std::fs::write(&p, plain).unwrap();
            p
        });
        let write = |suffix: &str, bytes: Vec<u8>| {
            let p = dir.path().join(format!("{name}{suffix}.wav"));
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let extended = with_fmt_extra(plain, &extra, None);
        assert_eq!(load(&write("", extended.clone())), want, "{name}");
        // A LIST chunk after the data: the chunks after the fmt chunk are found where they are.
        let mut tagged = extended.clone();
        tagged.extend(list);
        let riff = tagged.len() as u32 - 8;
        tagged[4..8].copy_from_slice(&riff.to_le_bytes());
        assert_eq!(
            load(&write("_list", tagged)),
            want,
            "{name} with a LIST chunk"
        );
        // Written to a pipe: RIFF and data sizes at a placeholder as well.
        for placeholder in [0u32, u32::MAX] {
            let mut piped = with_fmt_extra(plain, &extra, Some(placeholder));
            let data = piped.windows(4).position(|w| w == b"data").unwrap();
            piped[data + 4..data + 8].copy_from_slice(&placeholder.to_le_bytes());
            let p = write(&format!("_piped_{placeholder:x}"), piped);
            assert_eq!(load(&p), want, "{name} piped {placeholder:#x}");
        }
    }
}

/// A WAV file's bytes with its fmt chunk made WAVE_FORMAT_EXTENSIBLE: the plain file's 16
/// fields under tag 0xFFFE, then cbSize `cb`, `valid` bits, the channel `mask`, the
/// sub-format GUID of the plain tag (of the sub-format's, for a file already extensible),
/// and `more` bytes of extension after those.
fn as_extensible(wav: &[u8], cb: u16, valid: u16, mask: u32, more: usize) -> Vec<u8> {
    let tag = match u16::from_le_bytes(wav[20..22].try_into().unwrap()) {
        // Already extensible: its sub-format's tag.
        0xFFFE => u16::from_le_bytes(wav[44..46].try_into().unwrap()),
        tag => tag,
    };
    let mut extra = cb.to_le_bytes().to_vec();
    extra.extend(valid.to_le_bytes());
    extra.extend(mask.to_le_bytes());
    extra.extend(tag.to_le_bytes());
    extra.extend([
        0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
    ]);
    extra.extend(vec![0x5A; more]);
    let mut out = with_fmt_extra(wav, &extra, None);
    out[20..22].copy_from_slice(&0xFFFEu16.to_le_bytes());
    out
}

/// WAVE_FORMAT_EXTENSIBLE files that symphonia 0.5 refuses decode to the plain file's
/// samples: a cbSize above 22 (with its extra bytes), a channel mask naming positions
/// symphonia does not know (SPEAKER_ALL, reserved bits), and G.711 mu-law (whose GUID
/// symphonia does not recognise), which ffmpeg reads too, and valid bits above the sample
/// width (ffmpeg decodes by the valid bits there, and misreads the frames); so does each
/// written to a pipe. Extensible files symphonia reads itself (PCM, float, A-law) give the
/// plain file's samples too, and one that ffmpeg refuses as well (cbSize 0: no extension)
/// is refused with a message naming the file.
#[test]
fn extensible_wav_decodes_to_the_plain_file_s_samples() {
    let dir = tempfile::tempdir().unwrap();
    let pcm = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let float = std::fs::read(fixture("audio/speech_f32.wav")).unwrap();
    let s24 = std::fs::read(fixture("audio/speech_s24.wav")).unwrap();
    // The oracle's speech in G.711 with 18-byte fmt chunks, which symphonia reads itself.
    let reference = reference_speech();
    let g711 = |tag: u16, encode: fn(i16) -> u8| {
        let data: Vec<u8> = reference
            .iter()
            .map(|&v| encode((v * 32768.0).round().clamp(-32768.0, 32767.0) as i16))
            .collect();
        let mut w = b"RIFF\0\0\0\0WAVEfmt \x12\0\0\0".to_vec();
        w.extend(tag.to_le_bytes());
        w.extend(1u16.to_le_bytes());
        w.extend(16_000u32.to_le_bytes());
        w.extend(16_000u32.to_le_bytes());
        w.extend(1u16.to_le_bytes());
        w.extend(8u16.to_le_bytes());
        w.extend(0u16.to_le_bytes());
        w.extend(b"data");
        w.extend((data.len() as u32).to_le_bytes());
        w.extend(data);
        let riff = w.len() as u32 - 8;
        w[4..8].copy_from_slice(&riff.to_le_bytes());
        w
    };
    let mulaw = g711(7, linear_to_mulaw);
    let alaw = g711(6, linear_to_alaw);
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(format!("{name}.wav"));
        std::fs::write(&p, bytes).unwrap();
        p
    };
    for (name, plain, cb, valid, mask, more) in [
        ("pcm_cb24", &pcm, 24u16, 16u16, 4u32, 2usize),
        ("pcm_speaker_all", &pcm, 22, 16, 0x8000_0000, 0),
        ("pcm_reserved_mask", &pcm, 22, 16, 0x0800_0000, 0),
        ("s24_valid_32", &s24, 22, 32, 4, 0),
        ("float_cb23", &float, 23, 32, 4, 1),
        ("mulaw", &mulaw, 22, 8, 4, 0),
        ("mulaw_speaker_all", &mulaw, 22, 8, 0x8000_0000, 0),
        // Read by symphonia as they are.
        ("pcm", &pcm, 22, 16, 4, 0),
        ("s24", &s24, 22, 24, 4, 0),
        ("float", &float, 22, 32, 0, 0),
        ("alaw", &alaw, 22, 8, 4, 0),
    ] {
        let want = load(&write(&format!("{name}_plain"), plain));
        let extensible = as_extensible(plain, cb, valid, mask, more);
        assert_eq!(load(&write(name, &extensible)), want, "{name}");
        for placeholder in [0u32, u32::MAX] {
            let mut piped = extensible.clone();
            piped[4..8].copy_from_slice(&placeholder.to_le_bytes());
            let data = piped.windows(4).position(|w| w == b"data").unwrap();
            piped[data + 4..data + 8].copy_from_slice(&placeholder.to_le_bytes());
            let p = write(&format!("{name}_piped_{placeholder:x}"), &piped);
            assert_eq!(load(&p), want, "{name} piped {placeholder:#x}");
        }
    }
    let no_extension = write("cb0", &as_extensible(&pcm, 0, 16, 4, 0));
    let err = audio::load_16k_mono(&no_extension, Segment::whole())
        .expect_err("an extensible fmt chunk without its extension")
        .to_string();
    assert!(err.contains("cb0.wav"), "names the file: {err}");
}

/// A WAV whose block alignment is 0, or whose bits per sample are no width symphonia
/// decodes (12 bits in 16-bit samples; 255 in an extensible chunk, whose GUID names the
/// codec), while the other field says the width, decodes to the plain file's samples, as
/// ffmpeg reads it (symphonia alone refused every one, "block size is 0" or "bits per
/// sample ... must be 8, 16, 24 or 32"); so does each written to a pipe. Fields that
/// contradict each other, and a plain chunk's bits that name no decoder, are refused.
#[test]
fn wav_with_a_zero_block_alignment_or_unusable_bits_decodes_to_the_plain_file_s_samples() {
    let dir = tempfile::tempdir().unwrap();
    let pcm = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let u8 = std::fs::read(fixture("audio/speech_u8.wav")).unwrap();
    let float = std::fs::read(fixture("audio/speech_f32.wav")).unwrap();
    let s32 = std::fs::read(fixture("audio/speech_s32.wav")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(format!("{name}.wav"));
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // Block alignment at byte 32, bits per sample at 34 (the fmt chunk first in each).
    for (name, plain, align, bits) in [
        ("s16_align0", &pcm, Some(0u16), None),
        ("s16_as_12_bits", &pcm, None, Some(12u16)),
        ("s16_as_12_bits_align0", &pcm, Some(0), Some(12)),
        ("u8_align0", &u8, Some(0), None),
        ("f32_align0", &float, Some(0), None),
        ("s32_extensible_bits255", &s32, None, Some(255)),
        ("s32_extensible_align0", &s32, Some(0), None),
    ] {
        assert_eq!(&plain[12..16], b"fmt ", "{name}: the fmt chunk first");
        let want = load(&write(&format!("{name}_plain"), plain));
        let mut file = plain.clone();
        if let Some(a) = align {
            file[32..34].copy_from_slice(&a.to_le_bytes());
        }
        if let Some(b) = bits {
            file[34..36].copy_from_slice(&b.to_le_bytes());
        }
        assert_eq!(load(&write(name, &file)), want, "{name}");
        let data = file.windows(4).position(|w| w == b"data").unwrap();
        for placeholder in [0u32, u32::MAX] {
            let mut piped = file.clone();
            piped[4..8].copy_from_slice(&placeholder.to_le_bytes());
            piped[data + 4..data + 8].copy_from_slice(&placeholder.to_le_bytes());
            let p = write(&format!("{name}_piped_{placeholder:x}"), &piped);
            assert_eq!(load(&p), want, "{name} piped {placeholder:#x}");
        }
    }
    // Fields that contradict each other, and a plain chunk's bits that name no decoder (0,
    // 255: ffmpeg finds none either), are refused, naming the file.
    for (name, plain, align, bits) in [
        ("contradiction", &pcm, 3u16, 12u16),
        ("u8_bits0", &u8, 1, 0),
        ("f32_bits255", &float, 4, 255),
    ] {
        let mut file = plain.clone();
        file[32..34].copy_from_slice(&align.to_le_bytes());
        file[34..36].copy_from_slice(&bits.to_le_bytes());
        let p = write(name, &file);
        let err = audio::load_16k_mono(&p, Segment::whole())
            .expect_err(name)
            .to_string();
        assert!(
            err.contains(&format!("{name}.wav")),
            "names the file: {err}"
        );
    }
}

/// AIFF's sound chunk counts its 8 bytes of offset and block size in its size: the oracle's
/// speech in an AIFF (as Apple's tools write it: a filler chunk first, so the sound starts at
/// byte 4096; with and without a chunk after the sound) decodes to the reference, no sample
/// more or less.
#[test]
fn aiff_decodes_to_exactly_its_samples() {
    let wav = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let data = wav.windows(4).position(|w| w == b"data").unwrap();
    let size = u32::from_le_bytes(wav[data + 4..data + 8].try_into().unwrap()) as usize;
    // AIFF holds big-endian samples.
    let samples: Vec<u8> = wav[data + 8..data + 8 + size]
        .chunks_exact(2)
        .flat_map(|s| [s[1], s[0]])
        .collect();
    let frames = (samples.len() / 2) as u32;
    let chunk = |id: &[u8], body: &[u8]| -> Vec<u8> {
        let mut c = id.to_vec();
        c.extend((body.len() as u32).to_be_bytes());
        c.extend(body);
        if body.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    // COMM: 1 channel, the frames, 16 bits, 16,000 Hz as an 80-bit extended float.
    let mut comm = 1u16.to_be_bytes().to_vec();
    comm.extend(frames.to_be_bytes());
    comm.extend(16u16.to_be_bytes());
    comm.extend([0x40, 0x0C, 0xFA, 0, 0, 0, 0, 0, 0, 0]);
    let dir = tempfile::tempdir().unwrap();
    for trailer in [&b""[..], &chunk(b"ANNO", b"made by the earshot tests")] {
        let mut body = b"AIFF".to_vec();
        body.extend(chunk(b"COMM", &comm));
        // FORM and its size (8), this body so far, the filler's header (8), the SSND header
        // and its two fields (16): the samples start at byte 4096.
        let filler = 4096 - 8 - body.len() - 8 - 16;
        body.extend(chunk(b"FLLR", &vec![0u8; filler]));
        let mut ssnd = vec![0u8; 8]; // offset 0, block size 0
        ssnd.extend(&samples);
        body.extend(chunk(b"SSND", &ssnd));
        body.extend(trailer);
        let mut file = b"FORM".to_vec();
        file.extend((body.len() as u32).to_be_bytes());
        file.extend(body);
        assert_eq!(&file[4096 - 16..4096 - 12], b"SSND");
        let path = dir.path().join(format!("speech_{}.aiff", trailer.len()));
        std::fs::write(&path, &file).unwrap();
        assert_eq!(
            load(&path),
            reference_speech(),
            "trailer of {} bytes",
            trailer.len()
        );
    }
}

/// A CAF data chunk may give its size as -1 ("to the end of the file", what a recorder or
/// `ffmpeg ... -f caf -` leaves): the oracle's speech in a CAF written so, and in one with
/// the size filled in, decodes to the reference, from a file and from bytes in memory.
#[test]
fn caf_with_a_data_chunk_of_unknown_size_reads_to_the_end() {
    let wav = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let data = wav.windows(4).position(|w| w == b"data").unwrap();
    let size = u32::from_le_bytes(wav[data + 4..data + 8].try_into().unwrap()) as usize;
    let samples = &wav[data + 8..data + 8 + size];
    let chunk = |id: &[u8], size: i64, body: &[u8]| -> Vec<u8> {
        let mut c = id.to_vec();
        c.extend(size.to_be_bytes());
        c.extend(body);
        c
    };
    // desc: 16,000 Hz as an f64, 'lpcm', flags 2 (little-endian integers), 2 bytes and 1
    // frame a packet, 1 channel, 16 bits.
    let mut desc = 16_000f64.to_be_bytes().to_vec();
    desc.extend(b"lpcm");
    for v in [2u32, 2, 1, 1, 16] {
        desc.extend(v.to_be_bytes());
    }
    let mut body = 0u32.to_be_bytes().to_vec(); // edit count
    body.extend(samples);
    let dir = tempfile::tempdir().unwrap();
    for data_size in [-1, body.len() as i64] {
        let mut file = b"caff\0\x01\0\0".to_vec();
        file.extend(chunk(b"desc", 32, &desc));
        file.extend(chunk(b"data", data_size, &body));
        let path = dir.path().join(format!("speech_{data_size}.caf"));
        std::fs::write(&path, &file).unwrap();
        assert_eq!(load(&path), reference_speech(), "data size {data_size}");
        let from_bytes = audio::decode_file_mono(file, &path, Segment::whole(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_bytes.samples.len(), reference_speech().len());
    }
}

#[test]
fn wav_sample_formats_decode_to_the_same_signal() {
    let reference = reference_speech();
    // (fixture, tolerance): the s16 source re-encoded; only u8 loses precision.
    for (name, tol) in [
        ("audio/speech_u8.wav", 1.0 / 128.0 + 1e-6),
        ("audio/speech_s24.wav", 1e-6),
        ("audio/speech_s32.wav", 1e-6),
        ("audio/speech_f32.wav", 1e-6),
        ("audio/speech_f64.wav", 1e-6),
    ] {
        let got = load(&fixture(name));
        assert_eq!(got.len(), reference.len(), "{name}");
        let d = max_abs_diff(&got, &reference);
        assert!(d <= tol, "{name}: max abs diff {d} > {tol}");
    }
}

#[test]
fn stereo_44k1_downmixes_and_resamples_like_pyav() {
    let got = load(&whisper_oracle("audio/b_sine440_44k1_stereo.wav"));
    let (_, oracle) = read_npy(&whisper_oracle(
        "expected/decoded_b_sine440_44k1_stereo_wav.npy",
    ));
    assert_eq!(got.len(), 48000);
    // Every sample, edges included: earshot follows libswresample's filter and its mirrored
    // boundaries, so only the oracle's float rounding is left (the README's oracle says a
    // merely good resampler is ~8e-3 off at the first and last samples).
    let d = max_abs_diff(&got, &oracle);
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn flac_48k_stereo_comes_back_to_16k() {
    let got = load(&fixture("audio/speech_48k_stereo.flac"));
    let reference = reference_speech();
    assert_eq!(got.len(), reference.len());
    // Two band-limited resamplings (sox up, swr's filter down) of a signal with content up to 8 kHz.
    let d = max_abs_diff(
        &got[64..got.len() - 64],
        &reference[64..reference.len() - 64],
    );
    assert!(d <= 2e-2, "max abs diff {d}");
}

fn snr_db(signal: &[f32], reference: &[f32]) -> f64 {
    let noise: f64 = signal
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let power: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    10.0 * (power / noise).log10()
}

#[test]
fn mp3_is_gapless_and_sample_aligned() {
    let got = load(&fixture("audio/speech.mp3"));
    let reference = reference_speech();
    // LAME delay and padding trimmed: the exact source length, and aligned (a shift of even
    // one sample would wreck the SNR).
    assert_eq!(got.len(), reference.len());
    let snr = snr_db(&got, &reference);
    assert!(snr > 10.0, "SNR {snr:.1} dB");
}

#[test]
fn ogg_vorbis_has_exact_length() {
    let got = load(&fixture("audio/speech.ogg"));
    let reference = reference_speech();
    assert_eq!(got.len(), reference.len());
    assert!(snr_db(&got, &reference) > 10.0);
}

#[test]
fn aac_in_mp4_decodes() {
    // symphonia ignores the MP4 edit list, so the AAC encoder's 1024 priming samples stay at
    // the start; the end padding is cut at the container's declared duration.
    let got = load(&fixture("audio/speech.m4a"));
    assert_eq!(got.len(), 46536 + 1024);
    let reference = reference_speech();
    assert!(snr_db(&got[1024..], &reference) > 10.0);
}

#[test]
fn segment_is_the_slice_of_the_whole() {
    for name in ["audio/a_speech_16k.wav", "audio/a_speech_16k.flac"] {
        let path = whisper_oracle(name);
        let whole = load(&path);
        let seg = audio::load_16k_mono(
            &path,
            Segment {
                start: Some(1.0),
                end: Some(2.0),
            },
        )
        .unwrap();
        assert_eq!(seg, whole[16000..32000], "{name}");
        let tail = audio::load_16k_mono(
            &path,
            Segment {
                start: Some(2.5),
                end: None,
            },
        )
        .unwrap();
        assert_eq!(tail, whole[40000..], "{name}");
    }
    // MP3 seeks to the frame before and discards the head: the same samples as a full decode.
    let mp3 = fixture("audio/speech.mp3");
    let whole = load(&mp3);
    let seg = audio::load_16k_mono(
        &mp3,
        Segment {
            start: Some(1.0),
            end: Some(2.0),
        },
    )
    .unwrap();
    assert_eq!(seg.len(), 16000);
    let d = max_abs_diff(&seg, &whole[16000..32000]);
    assert!(d < 1e-2, "mp3 segment vs slice of the full decode: {d}");
}

#[test]
fn bad_segments_are_refused() {
    let path = whisper_oracle("audio/a_speech_16k.wav");
    for (start, end) in [
        (Some(2.0), Some(1.0)),
        (Some(-1.0), None),
        (Some(f64::NAN), None),
        (Some(10.0), None),
    ] {
        let err = audio::load_16k_mono(&path, Segment { start, end }).unwrap_err();
        assert!(matches!(err, AudioError::BadSegment { .. }), "{err}");
        assert!(err.to_string().contains("a_speech_16k.wav"), "{err}");
    }
}

#[test]
fn opus_is_reported_as_an_unsupported_codec() {
    let err = audio::load_16k_mono(&fixture("audio/speech.opus"), Segment::whole()).unwrap_err();
    assert!(matches!(err, AudioError::UnsupportedCodec { .. }), "{err}");
    assert!(err.to_string().contains("opus"), "{err}");
}

#[test]
fn audio_info_cli_reports_header_and_decoded_count() {
    let out = earshot(["audio-info", "--json"]).status.success();
    assert!(!out, "audio-info without an input must fail");
    let out = earshot([
        "audio-info".as_ref(),
        "--json".as_ref(),
        whisper_oracle("audio/b_sine440_44k1_stereo.wav").as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["container"], "wav");
    assert_eq!(v["codec"], "pcm_s16le");
    assert_eq!(v["sample_rate"], 44100);
    assert_eq!(v["channels"], 2);
    assert_eq!(v["samples_16k"], 48000);
    assert!((v["duration_s"].as_f64().unwrap() - 3.0).abs() < 1e-9);
}

/// IMA ADPCM (WAV format 0x11) of `samples`, mono: blocks of `block_align` bytes, each a
/// 4-byte header (the block's first sample and step index) and 4-bit codes, two a byte low
/// nibble first; the last block padded with silence. The encoder is the reference
/// algorithm of the IMA's recommended practice, so a correct decoder gets the signal back
/// to within 4-bit ADPCM's error.
fn ima_adpcm(samples: &[i16], block_align: usize) -> (Vec<u8>, usize) {
    const STEPS: [i32; 89] = [
        7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 21, 23, 25, 28, 31, 34, 37, 41, 45, 50, 55, 60,
        66, 73, 80, 88, 97, 107, 118, 130, 143, 157, 173, 190, 209, 230, 253, 279, 307, 337, 371,
        408, 449, 494, 544, 598, 658, 724, 796, 876, 963, 1060, 1166, 1282, 1411, 1552, 1707, 1878,
        2066, 2272, 2499, 2749, 3024, 3327, 3660, 4026, 4428, 4871, 5358, 5894, 6484, 7132, 7845,
        8630, 9493, 10442, 11487, 12635, 13899, 15289, 16818, 18500, 20350, 22385, 24623, 27086,
        29794, 32767,
    ];
    const INDEX: [i32; 16] = [-1, -1, -1, -1, 2, 4, 6, 8, -1, -1, -1, -1, 2, 4, 6, 8];
    let per_block = (block_align - 4) * 2 + 1;
    let mut out = Vec::new();
    let mut index = 0i32;
    for block in samples.chunks(per_block) {
        let mut block = block.to_vec();
        block.resize(per_block, 0);
        let mut predictor = i32::from(block[0]);
        out.extend(block[0].to_le_bytes());
        out.extend([index as u8, 0]);
        let mut codes = Vec::with_capacity(per_block - 1);
        for &s in &block[1..] {
            let step = STEPS[index as usize];
            let mut diff = i32::from(s) - predictor;
            let mut code = 0;
            if diff < 0 {
                code = 8;
                diff = -diff;
            }
            let (mut mask, mut part) = (4, step);
            while mask > 0 {
                if diff >= part {
                    code |= mask;
                    diff -= part;
                }
                part >>= 1;
                mask >>= 1;
            }
            // Track the decoder's predictor exactly.
            let mut delta = step >> 3;
            if code & 4 != 0 {
                delta += step;
            }
            if code & 2 != 0 {
                delta += step >> 1;
            }
            if code & 1 != 0 {
                delta += step >> 2;
            }
            predictor = if code & 8 != 0 {
                predictor - delta
            } else {
                predictor + delta
            };
            predictor = predictor.clamp(-32768, 32767);
            index = (index + INDEX[code as usize]).clamp(0, 88);
            codes.push(code as u8);
        }
        out.extend(codes.chunks(2).map(|c| c[0] | (c[1] << 4)));
    }
    (out, per_block)
}

/// A WAV of IMA ADPCM blocks with a `fact` chunk of `fact_frames`.
fn ima_adpcm_wav(
    data: &[u8],
    rate: u32,
    block_align: u16,
    per_block: u16,
    fact_frames: u32,
) -> Vec<u8> {
    let mut fmt = 0x11u16.to_le_bytes().to_vec(); // WAVE_FORMAT_IMA_ADPCM
    fmt.extend(1u16.to_le_bytes()); // mono
    fmt.extend(rate.to_le_bytes());
    fmt.extend((rate * u32::from(block_align) / u32::from(per_block)).to_le_bytes());
    fmt.extend(block_align.to_le_bytes());
    fmt.extend(4u16.to_le_bytes()); // bits per sample
    fmt.extend(2u16.to_le_bytes()); // extra bytes
    fmt.extend(per_block.to_le_bytes());
    let chunk = |id: &[u8], body: &[u8]| -> Vec<u8> {
        let mut c = id.to_vec();
        c.extend((body.len() as u32).to_le_bytes());
        c.extend(body);
        if body.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let mut body = b"WAVE".to_vec();
    body.extend(chunk(b"fmt ", &fmt));
    body.extend(chunk(b"fact", &fact_frames.to_le_bytes()));
    body.extend(chunk(b"data", data));
    let mut file = b"RIFF".to_vec();
    file.extend((body.len() as u32).to_le_bytes());
    file.extend(body);
    file
}

/// Block-coded WAV pads its last block; the `fact` chunk says how many frames are real.
/// The oracle's speech (46,536 samples at 16 kHz) as IMA ADPCM in 256-byte blocks of 505
/// frames fills 93 blocks, 46,965 frames: decoded, it is the 46,536 real ones (symphonia
/// alone returns the 429 frames of padding too), close to the reference signal; a segment is
/// the slice of the whole (symphonia's seek lands past the data in such files), one that asks
/// past the end stops at the real end; and a `fact` that would cut more than the padding is
/// not believed.
#[test]
fn ima_adpcm_wav_decodes_to_its_fact_frames_not_the_last_block_s_padding() {
    let reference = reference_speech();
    let pcm: Vec<i16> = reference
        .iter()
        .map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect();
    let (data, per_block) = ima_adpcm(&pcm, 256);
    let blocks = pcm.len().div_ceil(per_block);
    assert_eq!(
        blocks * per_block,
        46_965,
        "the test needs a padded last block"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("speech_ima.wav");
    std::fs::write(
        &path,
        ima_adpcm_wav(&data, 16_000, 256, per_block as u16, pcm.len() as u32),
    )
    .unwrap();
    let info = audio::probe(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.frames, Some(pcm.len() as u64));
    let got = load(&path);
    assert_eq!(got.len(), reference.len());
    assert!(
        snr_db(&got, &reference) > 15.0,
        "{} dB",
        snr_db(&got, &reference)
    );
    // 2.8 s to 2.95 s: the audio ends at 2.9085 s.
    let segment = Segment {
        start: Some(2.8),
        end: Some(2.95),
    };
    // A segment inside the audio (symphonia's seek in block-coded WAV lands past the data).
    let inside = Segment {
        start: Some(1.0),
        end: Some(2.0),
    };
    let inside = audio::load_16k_mono(&path, inside).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inside, got[16_000..32_000]);
    let tail = audio::load_16k_mono(&path, segment).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tail, got[44_800..]);
    // A fact chunk that would cut more than the last block's padding is wrong: the
    // container's whole blocks are kept.
    std::fs::write(
        &path,
        ima_adpcm_wav(&data, 16_000, 256, per_block as u16, 100),
    )
    .unwrap();
    assert_eq!(load(&path).len(), blocks * per_block);
}
