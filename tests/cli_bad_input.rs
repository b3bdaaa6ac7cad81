//! Every kind of bad input gives a clear error naming the file and the cause, a non-zero
//! exit, and never a panic.

use std::path::{Path, PathBuf};

use earshot_tests::*;

/// Runs `earshot mel` on `input` and `earshot audio-info` too; both must fail cleanly with
/// stderr mentioning the file name and every one of `causes` (case-insensitive).
fn assert_clean_failure(input: &Path, causes: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    for args in [
        vec![
            "mel".into(),
            input.as_os_str().to_owned(),
            "--out".into(),
            out.as_os_str().to_owned(),
        ],
        vec!["audio-info".into(), input.as_os_str().to_owned()],
    ] {
        let o = earshot(&args);
        let stderr = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let name = input.file_name().unwrap().to_string_lossy().to_lowercase();
        assert!(
            stderr.contains(&name),
            "{args:?}: error does not name the file: {stderr}"
        );
        for cause in causes {
            assert!(
                stderr.contains(cause),
                "{args:?}: expected '{cause}' in: {stderr}"
            );
        }
        assert!(o.stdout.is_empty(), "nothing on stdout on failure");
    }
    assert!(
        !out.exists(),
        "no output file may be left behind on failure"
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn truncated_copy(dir: &Path, src: &Path, keep_fraction: f64) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let keep = (bytes.len() as f64 * keep_fraction) as usize;
    let name = format!("truncated_{}", src.file_name().unwrap().to_string_lossy());
    write(dir, &name, &bytes[..keep])
}

#[test]
fn empty_file() {
    let d = tempfile::tempdir().unwrap();
    assert_clean_failure(&write(d.path(), "empty.wav", b""), &["empty"]);
}

#[test]
fn truncated_wav_flac_mp3() {
    let d = tempfile::tempdir().unwrap();
    for src in [
        whisper_oracle("audio/a_speech_16k.wav"),
        whisper_oracle("audio/a_speech_16k.flac"),
        fixture("audio/speech.mp3"),
    ] {
        let t = truncated_copy(d.path(), &src, 0.6);
        assert_clean_failure(&t, &["truncated"]);
    }
}

/// The oracle's FLAC with its STREAMINFO sample count zeroed ("unknown", as a streaming
/// encoder leaves it), and optionally its MD5 zeroed too ("not computed").
fn flac_without_length(zero_md5: bool) -> Vec<u8> {
    let mut bytes = std::fs::read(whisper_oracle("audio/a_speech_16k.flac")).unwrap();
    // "fLaC", then the first metadata block's header: type 0 (STREAMINFO), length 34.
    assert_eq!(&bytes[..4], b"fLaC");
    assert_eq!(bytes[4] & 0x7f, 0);
    assert_eq!(&bytes[5..8], &[0, 0, 34]);
    // STREAMINFO from byte 8: the 36-bit sample count starts in the low nibble of its 14th
    // byte; the 16-byte MD5 ends the block.
    assert_ne!(
        &bytes[21..26],
        &[0; 5],
        "the oracle's FLAC has a length to remove"
    );
    bytes[21] &= 0xf0;
    bytes[22..26].fill(0);
    if zero_md5 {
        bytes[26..42].fill(0);
    }
    bytes
}

/// symphonia passes over a FLAC frame whose CRC fails, and a FLAC cut between frames just
/// ends: with no length in the header, only the MD5 of the decoded audio in STREAMINFO tells
/// such a file from a whole one, and it is checked. Without an MD5 a whole file still decodes.
#[test]
fn flac_without_a_length_damaged_or_cut_is_refused_by_its_md5() {
    let d = tempfile::tempdir().unwrap();
    let whole = write(d.path(), "whole.flac", &flac_without_length(false));
    let info = |path: &Path| {
        let o = earshot(&["audio-info".into(), path.as_os_str().to_owned()]);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{}: {stderr}", path.display());
        String::from_utf8(o.stdout).unwrap()
    };
    // 46,536 samples: the length of the oracle's WAV of the same speech.
    let wav_frames = (std::fs::metadata(whisper_oracle("audio/a_speech_16k.wav"))
        .unwrap()
        .len()
        - 44)
        / 2;
    for path in [
        &whole,
        &write(d.path(), "no_md5.flac", &flac_without_length(true)),
    ] {
        let out = info(path);
        assert!(
            out.contains(&format!("samples_16k: {wav_frames}")),
            "{}: {out}",
            path.display()
        );
    }

    let mut damaged = flac_without_length(false);
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x10;
    assert_clean_failure(&write(d.path(), "damaged.flac", &damaged), &["md5"]);
    let cut = flac_without_length(false);
    let cut = &cut[..cut.len() * 6 / 10];
    assert_clean_failure(&write(d.path(), "cut.flac", cut), &["md5"]);
}

/// Ogg carries no length, and symphonia passes over a page that fails its checksum: a real
/// Tux Paint recording cut short or damaged in the middle is refused by name, not decoded to
/// shorter audio.
#[test]
fn truncated_or_damaged_ogg() {
    let d = tempfile::tempdir().unwrap();
    let src = data_dir().join("tuxpaint-stamps-default/stamps/household/Washing-machine.ogg");
    let t = truncated_copy(d.path(), &src, 0.6);
    assert_clean_failure(&t, &["truncated", "ogg page"]);
    let mut bytes = std::fs::read(&src).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0x5a;
    }
    assert_clean_failure(&write(d.path(), "damaged.ogg", &bytes), &["checksum"]);
}

/// Two real recordings end on a whole page without the end-of-stream flag and hold all their
/// audio: they decode, to the length their last page's granule position gives, with a
/// warning naming the file.
#[test]
fn ogg_without_its_end_flag_decodes_whole_with_a_warning() {
    let file = data_dir().join("tuxpaint-stamps-default/stamps/plants/flowers/adeenia_desc_ml.ogg");
    let bytes = std::fs::read(&file).unwrap();
    // The sample rate from the Vorbis identification header (first page), the length from
    // the last page's granule position: read here from the bytes, not from earshot.
    let id = bytes
        .windows(7)
        .position(|w| w == b"\x01vorbis")
        .expect("a Vorbis identification header");
    let rate = u32::from_le_bytes(bytes[id + 12..id + 16].try_into().unwrap());
    let last = bytes
        .windows(4)
        .rposition(|w| w == b"OggS")
        .expect("an Ogg page");
    assert_eq!(bytes[last + 5] & 0x04, 0, "the last page has no end flag");
    let granule = u64::from_le_bytes(bytes[last + 6..last + 14].try_into().unwrap());
    let out = earshot(["audio-info".as_ref(), file.as_os_str()]);
    let stdout = expect_success(&out);
    // audio-info counts the samples after resampling to 16 kHz: within one of the granule's.
    let samples_16k: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("samples_16k: "))
        .expect("samples_16k")
        .parse()
        .unwrap();
    let expected = granule as f64 * 16_000.0 / rate as f64;
    assert!(
        (samples_16k - expected).abs() <= 1.0,
        "decoded {samples_16k} samples at 16 kHz, the last granule gives {expected}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("adeenia_desc_ml.ogg") && stderr.contains("no end-of-stream page"),
        "{stderr}"
    );
}

/// An AIFF of 1 s of 16-bit mono silence with `rate` as its COMM sample rate (80-bit
/// extended), after a filler chunk of `filler` bytes.
fn aiff_with_rate(rate: [u8; 10], filler: usize) -> Vec<u8> {
    let chunk = |id: &[u8], body: &[u8]| -> Vec<u8> {
        let mut c = id.to_vec();
        c.extend((body.len() as u32).to_be_bytes());
        c.extend(body);
        c
    };
    let mut comm = 1u16.to_be_bytes().to_vec();
    comm.extend(16_000u32.to_be_bytes());
    comm.extend(16u16.to_be_bytes());
    comm.extend(rate);
    let mut body = b"AIFF".to_vec();
    if filler > 0 {
        body.extend(chunk(b"FLLR", &vec![0u8; filler]));
    }
    body.extend(chunk(b"COMM", &comm));
    body.extend(chunk(b"SSND", &vec![0u8; 8 + 32_000]));
    let mut file = b"FORM".to_vec();
    file.extend((body.len() as u32).to_be_bytes());
    file.extend(body);
    file
}

/// A sample rate of 0 Hz, 0.01 Hz, infinity or NaN in an AIFF header is refused by name
/// (symphonia panics on each).
#[test]
fn aiff_with_an_impossible_sample_rate() {
    let d = tempfile::tempdir().unwrap();
    for (name, rate, cause) in [
        ("zero.aiff", [0u8; 10], "sample rate of 0 hz"),
        (
            "hundredth.aiff",
            [0x3f, 0xf8, 0xa3, 0xd7, 0x0a, 0x3d, 0x70, 0xa3, 0xd7, 0x0a],
            "sample rate of 0.01 hz",
        ),
        (
            "infinite.aiff",
            [0x7f, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0],
            "not a finite number",
        ),
        (
            "nan.aiff",
            [0x7f, 0xff, 0xc0, 0, 0, 0, 0, 0, 0, 0],
            "not a finite number",
        ),
    ] {
        assert_clean_failure(&write(d.path(), name, &aiff_with_rate(rate, 0)), &[cause]);
    }
}

/// A panic inside the decoder (here symphonia's, on a 0 Hz rate that the header check does
/// not reach behind a 4 KiB filler chunk) is the file's error: no "thread panicked" message
/// or backtrace on stderr, exit 1.
#[test]
fn a_decoder_panic_is_reported_as_the_file_s_error_without_a_panic_message() {
    let d = tempfile::tempdir().unwrap();
    let file = write(d.path(), "far.aiff", &aiff_with_rate([0u8; 10], 4096));
    assert_clean_failure(&file, &["far.aiff"]);
}

#[test]
fn header_only_truncation() {
    // Cut inside the header itself.
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(whisper_oracle("audio/a_speech_16k.wav")).unwrap();
    let p = write(d.path(), "header_cut.wav", &bytes[..20]);
    assert_clean_failure(&p, &[]);
}

#[test]
fn random_bytes_with_audio_extension() {
    let d = tempfile::tempdir().unwrap();
    // Deterministic pseudo-random bytes (xorshift).
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let bytes: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for name in ["noise.wav", "noise.mp3", "noise.flac", "noise.ogg"] {
        assert_clean_failure(&write(d.path(), name, &bytes), &[]);
    }
}

#[test]
fn text_file() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "notes.mp3",
        b"This is a text file, not audio.\nSecond line.\n",
    );
    assert_clean_failure(&p, &[]);
}

#[test]
fn directory() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("clips.wav");
    std::fs::create_dir(&sub).unwrap();
    assert_clean_failure(&sub, &["directory"]);
}

#[test]
fn missing_path() {
    let d = tempfile::tempdir().unwrap();
    assert_clean_failure(&d.path().join("does_not_exist.wav"), &["no such file"]);
}

fn float_wav(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn zero_length_wav() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("zero.wav");
    float_wav(&p, &[]);
    assert_clean_failure(&p, &["no audio samples"]);
}

#[test]
fn nan_and_inf_samples_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let mut samples = vec![0.1f32; 16000];
    samples[1234] = f32::NAN;
    let p = d.path().join("nan.wav");
    float_wav(&p, &samples);
    assert_clean_failure(&p, &["non-finite", "1234"]);
    samples[1234] = 0.0;
    samples[99] = f32::INFINITY;
    samples[100] = f32::NEG_INFINITY;
    let p = d.path().join("inf.wav");
    float_wav(&p, &samples);
    assert_clean_failure(&p, &["2 non-finite", "99"]);
}

#[test]
fn unsupported_codec() {
    assert_clean_failure(&fixture("audio/speech.opus"), &["unsupported codec opus"]);
}

/// A `.npy` whose header claims far more data than the file holds: refused from the
/// header, before anything is allocated (it used to reserve what the shape claimed).
#[test]
fn npy_header_claiming_terabytes_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 80, 1000000000000), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    let npy = write(d.path(), "huge.npy", &bytes);
    let out = earshot([
        "encode".as_ref(),
        npy.as_os_str(),
        "--whisper".as_ref(),
        default_whisper().as_os_str(),
        "--out".as_ref(),
        d.path().join("out.npy").as_os_str(),
    ]);
    let err = expect_failure(&out);
    assert!(
        err.contains("huge.npy") && err.contains("needs more data than the file"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !d.path().join("out.npy").exists());
}

/// Inputs the fuzzer (scripts/fuzz.sh) crashed the decoder with: each fails cleanly.
#[test]
fn fuzzer_findings_fail_cleanly() {
    // WAVE_FORMAT_EXTENSIBLE claiming 64513 channels: symphonia's channel-mask arithmetic
    // overflows (a panic with overflow checks, which a dev build has for dependencies).
    assert_clean_failure(
        &fixture("fuzz/wav-extensible-64513-channels.wav"),
        &[
            "cannot read this variant of the wav format",
            "too many channels",
        ],
    );
}

/// A RIFF/WAVE file the WAV reader recognises but cannot read is named as such, with the
/// reader's reason: not "not audio" (which would send the user looking for a wrong file).
#[test]
fn unreadable_wav_variants_are_named_as_wav() {
    let d = tempfile::tempdir().unwrap();
    let riff = |fmt: &[u8], rest: &[u8]| {
        let mut body = b"WAVEfmt ".to_vec();
        body.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        body.extend_from_slice(fmt);
        body.extend_from_slice(rest);
        let mut file = b"RIFF".to_vec();
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&body);
        file
    };
    let data = |bytes: &[u8]| {
        let mut chunk = b"data".to_vec();
        chunk.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        chunk.extend_from_slice(bytes);
        chunk
    };
    // WAVE_FORMAT_EXTENSIBLE, mono 16-bit, whose sub-format GUID is no known codec.
    let mut extensible = vec![0xFE, 0xFF, 1, 0];
    extensible.extend_from_slice(&48_000u32.to_le_bytes());
    extensible.extend_from_slice(&96_000u32.to_le_bytes());
    extensible.extend_from_slice(&[2, 0, 16, 0, 22, 0, 16, 0, 4, 0, 0, 0]);
    extensible.extend_from_slice(b"not-a-known-guid");
    let p = write(
        d.path(),
        "unknown_guid.wav",
        &riff(&extensible, &data(&[0; 64])),
    );
    assert_clean_failure(&p, &["variant of the wav format", "sub-type"]);
    // A well-formed PCM header and no data chunk at all.
    let mut pcm = vec![1, 0, 1, 0];
    pcm.extend_from_slice(&16_000u32.to_le_bytes());
    pcm.extend_from_slice(&32_000u32.to_le_bytes());
    pcm.extend_from_slice(&[2, 0, 16, 0]);
    let p = write(d.path(), "no_data_chunk.wav", &riff(&pcm, b""));
    assert_clean_failure(&p, &["variant of the wav format", "missing data chunk"]);
}

/// The exit statuses `earshot --help` documents: 2 for a bad command line, 1 for a failed
/// command (here a missing file), and the list itself in the help text.
#[test]
fn exit_statuses_are_documented_and_distinct() {
    let help = expect_success(&earshot(["--help"]));
    for status in [
        "0 success",
        "1 the command failed",
        "2 usage error",
        "3 partial failure",
        "4 integrity",
    ] {
        assert!(help.contains(status), "--help lacks {status:?}: {help}");
    }
    let err = expect_exit(&earshot(["caption", "--no-such-flag"]), EXIT_USAGE);
    assert!(err.contains("--no-such-flag"), "{err}");
    let err = expect_failure(&earshot(["inspect", "/no/such/model.gguf"]));
    assert!(err.contains("/no/such/model.gguf"), "{err}");
}

/// A FIFO given where a file is read used to block the open forever (waiting for a writer),
/// and a device such as /dev/zero never ends: every command that reads an input file
/// refuses both at once, naming what the path is. Run under `timeout` so a regression fails
/// instead of hanging the suite.
#[test]
fn fifos_and_devices_are_refused_without_waiting() {
    let d = tempfile::tempdir().unwrap();
    let fifo = |name: &str| {
        let p = d.path().join(name);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p.display().to_string()
    };
    let (wav, toml, wasm, jsonl, gguf) = (
        fifo("pipe.wav"),
        fifo("pipe.toml"),
        fifo("pipe.wasm"),
        fifo("pipe.jsonl"),
        fifo("pipe.gguf"),
    );
    let out = d.path().join("out.npy").display().to_string();
    let whisper = default_whisper().display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["audio-info", &wav], "fifo"),
        (vec!["mel", &wav, "--out", &out], "fifo"),
        (
            vec!["encode", &wav, "--whisper", &whisper, "--out", &out],
            "fifo",
        ),
        (vec!["audio-info", "/dev/zero"], "character device"),
        (
            vec!["mel", "/dev/urandom", "--out", &out],
            "character device",
        ),
        (vec!["train", &toml], "fifo"),
        (vec!["train", "--config", &toml], "fifo"),
        (vec!["plugin", "check", &wasm], "fifo"),
        (vec!["plugin", "check", "/dev/zero"], "character device"),
        (vec!["eval", "--predictions", &jsonl], "fifo"),
        (
            vec!["eval", "--predictions", "/dev/zero"],
            "character device",
        ),
        (vec!["generate", "--llm", &gguf, "--prompt", "hi"], "fifo"),
        (vec!["inspect", &gguf], "fifo"),
    ];
    for (args, what) in cases {
        let o = earshot_with_timeout(&args, 60);
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(what) && err.contains("not a regular file"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!Path::new(&out).exists());
}

/// An output given as a pipe or device (`/dev/stdout`, a FIFO, bash's `>(...)`, `/dev/null`)
/// gets the bytes and stays what it is: the atomic rename used for files replaced it (as
/// root, `/dev/null` itself became a file) or failed where no temporary file can go
/// (`/dev/fd`). A FIFO stands for `/dev/null` here, so that a regression cannot replace the
/// machine's `/dev/null`.
#[test]
fn outputs_into_pipes_and_devices_are_written_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let clip = repo_root().join("configs/data/tones/clips/one.wav");
    let file = d.path().join("mel.npy");
    expect_success(&earshot([
        "mel".as_ref(),
        clip.as_os_str(),
        "--out".as_ref(),
        file.as_os_str(),
    ]));
    let expected = std::fs::read(&file).unwrap();

    let o = earshot([
        "mel".as_ref(),
        clip.as_os_str(),
        "--out".as_ref(),
        "/proc/self/fd/1".as_ref(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stdout == expected,
        "/dev/stdout got {} bytes",
        o.stdout.len()
    );

    let fifo = d.path().join("pipe.npy");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let o = earshot_with_timeout(
        &[
            "mel".as_ref(),
            clip.as_os_str(),
            "--out".as_ref(),
            fifo.as_os_str(),
        ],
        60,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Checked before joining: had the FIFO been renamed over, the reader would wait.
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(reader.join().unwrap() == expected);
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
}
