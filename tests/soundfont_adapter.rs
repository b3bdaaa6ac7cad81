//! The `soundfont` dataset adapter: on small SoundFonts built here (labels, splits by preset
//! group, rendering, damaged files) and on the real FluidR3 GM file the set-up fetches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use earshot::plugins::{DatasetAdapter, Example, PluginHost, SandboxLimits};
use earshot_tests::*;

fn host() -> PluginHost {
    PluginHost::new(SandboxLimits::default(), None)
}

/// A sample to write: name, points, rate, original pitch, loop (relative to the start) and
/// type (1 mono, 2 right, 4 left).
struct Sample {
    name: &'static str,
    points: Vec<i16>,
    rate: u32,
    pitch: u8,
    looped: Option<(u32, u32)>,
    kind: u16,
}

/// An instrument zone: sample index, overriding root key, sample mode.
struct Zone(u16, Option<i16>, u16);

#[derive(Default)]
struct Sf2 {
    samples: Vec<Sample>,
    instruments: Vec<(&'static str, Vec<Zone>)>,
    /// name, program, bank, instrument indices
    presets: Vec<(&'static str, u16, u16, Vec<u16>)>,
    /// Sample headers patched after layout: (sample index, start, end) in points.
    patch_bounds: Option<(usize, u32, u32)>,
}

fn tone(seconds: f64, rate: u32, hz: f64) -> Vec<i16> {
    (0..(seconds * rate as f64) as usize)
        .map(|i| ((i as f64 * hz * 2.0 * std::f64::consts::PI / rate as f64).sin() * 8000.0) as i16)
        .collect()
}

fn chunk(id: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = id.to_vec();
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
    out
}

fn list(kind: &[u8; 4], chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut body = kind.to_vec();
    for c in chunks {
        body.extend_from_slice(c);
    }
    chunk(b"LIST", &body)
}

fn name20(s: &str) -> [u8; 20] {
    let mut n = [0u8; 20];
    n[..s.len()].copy_from_slice(s.as_bytes());
    n
}

impl Sf2 {
    fn bytes(&self) -> Vec<u8> {
        let mut smpl = Vec::new();
        let mut shdr = Vec::new();
        let mut at = 0u32;
        for (i, s) in self.samples.iter().enumerate() {
            for p in &s.points {
                smpl.extend_from_slice(&p.to_le_bytes());
            }
            let (mut start, mut end) = (at, at + s.points.len() as u32);
            if let Some((j, a, b)) = self.patch_bounds {
                if i == j {
                    (start, end) = (a, b);
                }
            }
            let (ls, le) = s.looped.map_or((start, start), |(a, b)| (at + a, at + b));
            shdr.extend_from_slice(&name20(s.name));
            for v in [start, end, ls, le, s.rate] {
                shdr.extend_from_slice(&v.to_le_bytes());
            }
            shdr.extend_from_slice(&[s.pitch, 0]);
            shdr.extend_from_slice(&0u16.to_le_bytes());
            shdr.extend_from_slice(&s.kind.to_le_bytes());
            // 46 zero points after each sample, as the format asks.
            smpl.extend_from_slice(&[0u8; 92]);
            at += s.points.len() as u32 + 46;
        }
        shdr.extend_from_slice(&[0u8; 46]);
        shdr[(self.samples.len() * 46)..][..3].copy_from_slice(b"EOS");

        let (mut inst, mut ibag, mut igen) = (Vec::new(), Vec::new(), Vec::new());
        let gen = |out: &mut Vec<u8>, op: u16, amount: [u8; 2]| {
            out.extend_from_slice(&op.to_le_bytes());
            out.extend_from_slice(&amount);
        };
        let (mut nbag, mut ngen) = (0u16, 0u16);
        for (name, zones) in &self.instruments {
            inst.extend_from_slice(&name20(name));
            inst.extend_from_slice(&nbag.to_le_bytes());
            for z in zones {
                ibag.extend_from_slice(&ngen.to_le_bytes());
                ibag.extend_from_slice(&0u16.to_le_bytes());
                if let Some(k) = z.1 {
                    gen(&mut igen, 58, k.to_le_bytes());
                    ngen += 1;
                }
                gen(&mut igen, 54, z.2.to_le_bytes());
                gen(&mut igen, 53, z.0.to_le_bytes());
                ngen += 2;
                nbag += 1;
            }
        }
        inst.extend_from_slice(&name20("EOI"));
        inst.extend_from_slice(&nbag.to_le_bytes());
        ibag.extend_from_slice(&ngen.to_le_bytes());
        ibag.extend_from_slice(&0u16.to_le_bytes());
        igen.extend_from_slice(&[0u8; 4]);

        let (mut phdr, mut pbag, mut pgen) = (Vec::new(), Vec::new(), Vec::new());
        let (mut nbag, mut ngen) = (0u16, 0u16);
        for (name, program, bank, insts) in &self.presets {
            phdr.extend_from_slice(&name20(name));
            for v in [*program, *bank, nbag] {
                phdr.extend_from_slice(&v.to_le_bytes());
            }
            phdr.extend_from_slice(&[0u8; 12]);
            for i in insts {
                pbag.extend_from_slice(&ngen.to_le_bytes());
                pbag.extend_from_slice(&0u16.to_le_bytes());
                gen(&mut pgen, 41, i.to_le_bytes());
                ngen += 1;
                nbag += 1;
            }
        }
        phdr.extend_from_slice(&name20("EOP"));
        for v in [0u16, 0, nbag] {
            phdr.extend_from_slice(&v.to_le_bytes());
        }
        phdr.extend_from_slice(&[0u8; 12]);
        pbag.extend_from_slice(&ngen.to_le_bytes());
        pbag.extend_from_slice(&0u16.to_le_bytes());
        pgen.extend_from_slice(&[0u8; 4]);

        let info = list(
            b"INFO",
            &[chunk(b"ifil", &[2, 0, 1, 0]), chunk(b"INAM", b"test\0\0")],
        );
        let sdta = list(b"sdta", &[chunk(b"smpl", &smpl)]);
        let pdta = list(
            b"pdta",
            &[
                chunk(b"phdr", &phdr),
                chunk(b"pbag", &pbag),
                chunk(b"pmod", &[0u8; 10]),
                chunk(b"pgen", &pgen),
                chunk(b"inst", &inst),
                chunk(b"ibag", &ibag),
                chunk(b"imod", &[0u8; 10]),
                chunk(b"igen", &igen),
                chunk(b"shdr", &shdr),
            ],
        );
        let mut body = b"sfbk".to_vec();
        for part in [info, sdta, pdta] {
            body.extend_from_slice(&part);
        }
        chunk(b"RIFF", &body)
    }
}

fn mono(name: &'static str, seconds: f64, rate: u32, hz: f64) -> Sample {
    Sample {
        name,
        points: tone(seconds, rate, hz),
        rate,
        pitch: 60,
        looped: None,
        kind: 1,
    }
}

/// Two piano presets (one playing a stereo pair and a looped sample), an organ preset
/// sharing its recordings with a second organ preset, a third organ preset, a strings
/// preset sharing a sample with a piano preset, a synth lead (a family left out by default)
/// and a drum kit (bank 128).
fn small_font() -> Sf2 {
    let mut looped = mono("piano loop", 0.2, 22050, 440.0);
    looped.looped = Some((1000, 3000));
    let mut left = mono("piano L", 1.5, 32000, 220.0);
    left.kind = 4;
    let mut right = mono("piano R", 1.5, 32000, 220.0);
    right.kind = 2;
    Sf2 {
        samples: vec![
            looped,                                // 0
            left,                                  // 1
            right,                                 // 2
            mono("piano long", 6.0, 44100, 110.0), // 3
            mono("organ a", 1.2, 44100, 330.0),    // 4
            mono("organ b", 1.2, 44100, 660.0),    // 5
            mono("organ c", 1.0, 44100, 880.0),    // 6
            mono("shared", 1.0, 22050, 500.0),     // 7
            mono("lead", 1.0, 22050, 500.0),       // 8
            mono("kick", 0.5, 22050, 60.0),        // 9
        ],
        instruments: vec![
            (
                "Piano A",
                vec![
                    Zone(0, Some(84), 1),
                    Zone(1, Some(40), 0),
                    Zone(2, Some(40), 0),
                ],
            ),
            ("Piano B", vec![Zone(3, None, 0), Zone(7, Some(60), 0)]),
            ("Organ AB", vec![Zone(4, Some(50), 0), Zone(5, Some(74), 0)]),
            ("Organ C", vec![Zone(6, Some(60), 0)]),
            ("Strings", vec![Zone(7, Some(60), 0)]),
            ("Lead", vec![Zone(8, None, 0)]),
            ("Kit", vec![Zone(9, None, 0)]),
        ],
        presets: vec![
            ("Grand", 0, 0, vec![0]),
            ("Upright", 3, 0, vec![1]),
            ("Organ 1", 16, 0, vec![2]),
            ("Organ 2", 17, 0, vec![2]),
            ("Organ 3", 19, 0, vec![3]),
            ("Violin", 40, 0, vec![4]),
            ("Square", 80, 0, vec![5]),
            ("Standard", 0, 128, vec![6]),
        ],
        patch_bounds: None,
    }
}

fn write_font(dir: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("test.sf2"), bytes).unwrap();
}

/// Two examples per call: the adapter's paging (and its byte cap) is exercised.
fn all(ds: &mut DatasetAdapter, split: &str) -> Vec<Example> {
    read_all(ds, split, 2)
}

fn meta<'a>(ex: &'a Example, key: &str) -> &'a str {
    metadata_value(ex, key).unwrap_or_else(|| panic!("{}: no metadata {key}", ex.id))
}

/// (sample rate, seconds) of a 16-bit mono PCM WAV.
fn wav_shape(ex: &Example) -> (u32, f64) {
    let earshot::plugins::AudioSource::Inline(b) = &ex.audio else {
        panic!("{}: audio is not inline", ex.id)
    };
    assert_eq!(&b[0..4], b"RIFF");
    assert_eq!(&b[8..16], b"WAVEfmt ");
    assert_eq!(u16::from_le_bytes([b[22], b[23]]), 1, "mono");
    assert_eq!(u16::from_le_bytes([b[34], b[35]]), 16, "16-bit");
    let rate = u32::from_le_bytes(b[24..28].try_into().unwrap());
    let data = u32::from_le_bytes(b[40..44].try_into().unwrap());
    assert_eq!(b.len(), 44 + data as usize);
    (rate, data as f64 / 2.0 / rate as f64)
}

#[test]
fn labels_splits_and_renders_a_small_font() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    write_font(&dir, &small_font().bytes());
    // `eval_fraction`: the old name of test_fraction. No validation split here (the real
    // font's test below has one).
    let options = r#"{"eval_fraction": 0.3, "valid_fraction": 0.0, "min_duration_s": 1.0, "max_duration_s": 4.0}"#;
    let mut ds = DatasetAdapter::open(&host(), &first_party("soundfont"), &dir, options).unwrap();
    assert_eq!(ds.dataset.splits, vec!["train", "valid", "test"]);
    assert!(all(&mut ds, "valid").is_empty());
    let w = ds.dataset.warnings.join("\n");
    assert!(
        w.contains("sample 'shared' is played by presets of several families (piano, strings)"),
        "{w}"
    );
    let train = all(&mut ds, "train");
    let eval = all(&mut ds, "test");
    let by_id: BTreeMap<&str, &Example> = train
        .iter()
        .chain(&eval)
        .map(|e| (e.id.as_str(), e))
        .collect();
    // Left half of the stereo pair only; no synth lead, no drum kit, no shared sample.
    let ids: BTreeSet<&str> = by_id.keys().copied().collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "Grand/piano loop",
            "Grand/piano L",
            "Upright/piano long",
            "Organ 1/organ a",
            "Organ 1/organ b",
            "Organ 3/organ c",
        ])
    );
    let loop_ex = by_id["Grand/piano loop"];
    assert_eq!(meta(loop_ex, "family"), "piano");
    assert_eq!(meta(loop_ex, "root_key"), "84");
    assert_eq!(meta(loop_ex, "note"), "C6");
    assert_eq!(meta(loop_ex, "register"), "high");
    assert_eq!(
        loop_ex.target.as_deref(),
        Some("A piano note in the high register.")
    );
    assert!(loop_ex.references.is_empty(), "the target is not repeated");
    // A 0.2 s looped sample is played out to 1 s.
    let (rate, secs) = wav_shape(loop_ex);
    assert_eq!(rate, 22050);
    assert!((secs - 1.0).abs() < 1e-3, "{secs}");
    assert_eq!(meta(loop_ex, "duration_s"), "1.00");
    // A 6 s recording is cut to 4 s; an unlooped 1.5 s one is left as it is.
    assert!((wav_shape(by_id["Upright/piano long"]).1 - 4.0).abs() < 1e-3);
    assert!((wav_shape(by_id["Grand/piano L"]).1 - 1.5).abs() < 1e-3);
    assert_eq!(meta(by_id["Grand/piano L"], "register"), "low");
    assert_eq!(meta(by_id["Upright/piano long"], "root_key"), "60");
    assert_eq!(meta(by_id["Upright/piano long"], "register"), "middle");
    assert_eq!(meta(by_id["Organ 1/organ b"], "register"), "high");
    assert_eq!(meta(by_id["Organ 1/organ a"], "family"), "organ");

    // Splits by preset group: Organ 1 and Organ 2 share recordings and stay together; no
    // preset has recordings on both sides; each family keeps a group for training.
    let presets = |xs: &[Example]| -> BTreeSet<String> {
        xs.iter().map(|e| meta(e, "preset").to_string()).collect()
    };
    assert!(presets(&train).is_disjoint(&presets(&eval)));
    for family in ["piano", "organ"] {
        let n = |xs: &[Example]| xs.iter().filter(|e| meta(e, "family") == family).count();
        assert!(
            n(&train) >= 1 && n(&eval) >= 1,
            "{family}: {} / {}",
            n(&train),
            n(&eval)
        );
    }
    let organ_ab: Vec<&str> = ["Organ 1/organ a", "Organ 1/organ b"]
        .into_iter()
        .map(|id| {
            if eval.iter().any(|e| e.id == id) {
                "test"
            } else {
                "train"
            }
        })
        .collect();
    assert_eq!(organ_ab[0], organ_ab[1], "a preset group is split");

    // Deterministic; another seed may choose other groups but keeps the invariants.
    let mut again =
        DatasetAdapter::open(&host(), &first_party("soundfont"), &dir, options).unwrap();
    let ids_of = |xs: &[Example]| xs.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids_of(&all(&mut again, "test")), ids_of(&eval));

    // A cap per family and split.
    let mut capped = DatasetAdapter::open(
        &host(),
        &first_party("soundfont"),
        &dir,
        r#"{"test_fraction": 0.3, "valid_fraction": 0.0, "max_per_family": 1}"#,
    )
    .unwrap();
    for split in ["train", "test"] {
        let xs = all(&mut capped, split);
        let families: Vec<&str> = xs.iter().map(|e| meta(e, "family")).collect();
        assert_eq!(families, vec!["piano", "organ"], "{split}");
    }

    // Options: other families, a caption template.
    let mut strings = DatasetAdapter::open(
        &host(),
        &first_party("soundfont"),
        &dir,
        r#"{"families": ["strings", "synth lead"], "test_fraction": 0.0, "valid_fraction": 0.0, "caption": "{preset}: {note}"}"#,
    )
    .unwrap();
    let xs = all(&mut strings, "train");
    let got = ids_and_targets(&xs);
    assert_eq!(
        got,
        vec![
            ("Violin/shared", Some("Violin: C4")),
            ("Square/lead", Some("Square: C4"))
        ]
    );
}

fn open_err(dir: &Path, bytes: &[u8], options: &str) -> String {
    write_font(dir, bytes);
    match DatasetAdapter::open(&host(), &first_party("soundfont"), dir, options) {
        Ok(_) => panic!("opened a damaged font"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn damaged_fonts_and_bad_options_are_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let good = small_font().bytes();

    // The file cut short inside the sample data.
    let err = open_err(&dir, &good[..good.len() - 3000], "");
    assert!(err.contains("test.sf2: truncated file"), "{err}");

    // A chunk claiming more bytes than its LIST holds (the shdr chunk, last in pdta).
    let mut bad = good.clone();
    let at = bad.windows(4).rposition(|w| w == b"shdr").unwrap();
    bad[at + 4..at + 8].copy_from_slice(&100_000u32.to_le_bytes());
    let err = open_err(&dir, &bad, "");
    assert!(err.contains("truncated chunk 'shdr'"), "{err}");

    // Sample offsets past the sample data.
    let mut font = small_font();
    font.patch_bounds = Some((3, 10, 50_000_000));
    let err = open_err(&dir, &font.bytes(), "");
    assert!(
        err.contains("sample 'piano long' ends at point 50000000, past the"),
        "{err}"
    );

    // A zero-length sample.
    let mut font = small_font();
    font.patch_bounds = Some((4, 500, 500));
    let err = open_err(&dir, &font.bytes(), "");
    assert!(err.contains("sample 'organ a' is empty"), "{err}");

    // A zone naming a sample that does not exist.
    let mut font = small_font();
    font.instruments[3].1[0].0 = 99;
    let err = open_err(&dir, &font.bytes(), "");
    assert!(
        err.contains("instrument 'Organ C': sample 99 does not exist"),
        "{err}"
    );

    // Not a SoundFont at all, and an empty file.
    let err = open_err(&dir, b"RIFF\x04\x00\x00\x00WAVE", "");
    assert!(err.contains("not a SoundFont 2 file"), "{err}");
    let err = open_err(&dir, b"", "");
    assert!(err.contains("too short"), "{err}");

    // Options.
    let err = open_err(&dir, &good, r#"{"families": ["kazoo"]}"#);
    assert!(err.contains("unknown GM family \"kazoo\""), "{err}");
    let err = open_err(&dir, &good, r#"{"file": "../etc/passwd"}"#);
    assert!(
        err.contains("must be a path inside the dataset root"),
        "{err}"
    );
    let err = open_err(&dir, &good, r#"{"test_fraction": 1.5}"#);
    assert!(err.contains("test_fraction: 1.5 is not in [0, 1)"), "{err}");
    let err = open_err(
        &dir,
        &good,
        r#"{"test_fraction": 0.6, "valid_fraction": 0.4}"#,
    );
    assert!(err.contains("leave nothing to train on"), "{err}");
    let err = open_err(&dir, &good, r#"{"colour": 1}"#);
    assert!(err.contains("unknown field `colour`"), "{err}");
    for bad in ["[0]", "[25]", "[5, 5]", "[-30]"] {
        let err = open_err(&dir, &good, &format!(r#"{{"train_transpose": {bad}}}"#));
        assert!(err.contains("train_transpose:"), "{bad}: {err}");
    }
}

/// The WAV's 16-bit samples.
fn wav_points(ex: &Example) -> Vec<i16> {
    let earshot::plugins::AudioSource::Inline(b) = &ex.audio else {
        panic!("{}: audio is not inline", ex.id)
    };
    b[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// `train_transpose`: train also holds each recording played at the other keys (an octave up
/// is every second point of the clip), labelled by the key played; valid and test are not
/// transposed.
#[test]
fn train_transpose_plays_training_recordings_at_other_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    write_font(&dir, &small_font().bytes());
    let base = r#""test_fraction": 0.3, "valid_fraction": 0.0"#;
    let open = |extra: &str| {
        DatasetAdapter::open(
            &host(),
            &first_party("soundfont"),
            &dir,
            &format!("{{{base}{extra}}}"),
        )
        .unwrap()
    };
    let mut plain = open("");
    let mut played = open(r#", "train_transpose": [-12, 12]"#);
    assert_eq!(
        ids_and_targets(&all(&mut plain, "test")),
        ids_and_targets(&all(&mut played, "test")),
        "test is not transposed"
    );
    let train = all(&mut plain, "train");
    let more = all(&mut played, "train");
    assert_eq!(more.len(), 3 * train.len());
    for ex in &train {
        let by_id = |suffix: &str| {
            more.iter()
                .find(|e| e.id == format!("{}{suffix}", ex.id))
                .unwrap_or_else(|| panic!("no {}{suffix}", ex.id))
        };
        let (same, up, down) = (by_id(""), by_id(" +12"), by_id(" -12"));
        assert_eq!(wav_points(same), wav_points(ex));
        let points = wav_points(ex);
        let octave_up: Vec<i16> = points.iter().step_by(2).copied().collect();
        assert_eq!(wav_points(up), octave_up, "{}", up.id);
        // An octave down: twice as long, the recorded points at even places.
        let low = wav_points(down);
        assert_eq!(low.len(), 2 * points.len() - 1);
        assert!(low.iter().step_by(2).eq(points.iter()), "{}", down.id);
        let root: i32 = meta(ex, "root_key").parse().unwrap();
        assert_eq!(meta(up, "key"), (root + 12).to_string());
        assert_eq!(meta(down, "key"), (root - 12).to_string());
        assert_eq!(meta(up, "transpose"), "12");
        let register = |key: i32| match key {
            k if k < 52 => "low",
            k if k >= 72 => "high",
            _ => "middle",
        };
        assert_eq!(meta(up, "register"), register(root + 12), "{}", up.id);
        assert_eq!(meta(down, "register"), register(root - 12), "{}", down.id);
        assert!(
            up.target.as_deref().unwrap().contains(register(root + 12)),
            "{:?}",
            up.target
        );
    }
}

/// The real FluidR3 GM SoundFont the set-up fetched: the eight default families in train,
/// valid and test, no preset and no example in two splits.
#[test]
fn fluidr3_gm_from_the_set_up() {
    let root = data_dir().join("fluid-soundfont-gm");
    assert!(
        root.join("FluidR3_GM.sf2").is_file(),
        "{}: missing; run scripts/setup.sh",
        root.display()
    );
    let mut ds = DatasetAdapter::open(&host(), &first_party("soundfont"), &root, "").unwrap();
    assert_eq!(ds.dataset.splits, vec!["train", "valid", "test"]);
    let train = all(&mut ds, "train");
    let valid = all(&mut ds, "valid");
    let eval = all(&mut ds, "test");
    assert!(
        train.len() > 300 && valid.len() > 40 && eval.len() > 100,
        "{} / {} / {}",
        train.len(),
        valid.len(),
        eval.len()
    );
    let families = |xs: &[Example]| -> BTreeSet<String> {
        xs.iter().map(|e| meta(e, "family").to_string()).collect()
    };
    let eight: BTreeSet<String> = [
        "piano", "organ", "guitar", "bass", "strings", "brass", "reed", "pipe",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(families(&train), eight);
    assert_eq!(families(&eval), eight);
    // Every family in valid too: test's groups overshooting both shares (organ, brass) must
    // not leave the checkpoint choice blind to a family.
    assert_eq!(families(&valid), eight);
    let presets = |xs: &[Example]| -> BTreeSet<String> {
        xs.iter().map(|e| meta(e, "preset").to_string()).collect()
    };
    let ids = |xs: &[Example]| -> BTreeSet<String> { xs.iter().map(|e| e.id.clone()).collect() };
    for (a, b) in [(&train, &valid), (&train, &eval), (&valid, &eval)] {
        assert!(presets(a).is_disjoint(&presets(b)));
        assert!(ids(a).is_disjoint(&ids(b)));
    }
    for ex in train.iter().chain(&valid).chain(&eval).step_by(37) {
        let (_, secs) = wav_shape(ex);
        assert!((0.1..=4.0 + 1e-6).contains(&secs), "{}: {secs} s", ex.id);
        let register = meta(ex, "register");
        assert!(["low", "middle", "high"].contains(&register));
        assert_eq!(
            ex.target.as_deref(),
            Some(format!("A {} note in the {register} register.", meta(ex, "family")).as_str())
        );
    }
}

/// `train_files`: the recordings of another SoundFont join train only, named by their file;
/// valid and test are the main file's as without it. Then on the real files of the set-up
/// (FluidR3 GM, TimGM6mb for train): valid and test unchanged, and no rendered note of
/// TimGM6mb has the audio of a valid or test note.
#[test]
fn train_files_add_recordings_to_train_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    write_font(&dir, &small_font().bytes());
    std::fs::create_dir_all(dir.join("more")).unwrap();
    std::fs::copy(dir.join("test.sf2"), dir.join("more/other.sf2")).unwrap();
    let base = r#""file": "test.sf2", "test_fraction": 0.3, "valid_fraction": 0.0"#;
    let open = |extra: &str| {
        DatasetAdapter::open(
            &host(),
            &first_party("soundfont"),
            &dir,
            &format!("{{{base}{extra}}}"),
        )
    };
    let mut plain = open("").unwrap();
    let mut more = open(r#", "train_files": ["more/other.sf2"]"#).unwrap();
    assert_eq!(
        ids_and_targets(&all(&mut plain, "test")),
        ids_and_targets(&all(&mut more, "test")),
        "test is the main file's"
    );
    let train = all(&mut plain, "train");
    let bigger = all(&mut more, "train");
    let extra: Vec<&Example> = bigger
        .iter()
        .filter(|e| e.id.starts_with("other.sf2:"))
        .collect();
    // Every kept recording of the other file (all its splits' worth) joins train.
    let all_main = all(&mut plain, "train").len() + all(&mut plain, "test").len();
    assert_eq!(extra.len(), all_main, "{:?}", ids_and_targets(&bigger));
    assert_eq!(bigger.len(), train.len() + extra.len());
    for e in &extra {
        assert!(
            e.target.is_some() && !meta(e, "family").is_empty(),
            "{}",
            e.id
        );
    }
    for bad in [
        r#"["../x.sf2"]"#,
        r#"["/etc/passwd"]"#,
        r#"["missing.sf2"]"#,
    ] {
        let err = open(&format!(r#", "train_files": {bad}"#))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("train_files") || err.contains("missing.sf2"),
            "{bad}: {err}"
        );
    }

    let root = data_dir();
    for f in [
        "fluid-soundfont-gm/FluidR3_GM.sf2",
        "timgm6mb-soundfont/TimGM6mb.sf2",
    ] {
        assert!(root.join(f).is_file(), "{f}: missing; run scripts/setup.sh");
    }
    let real = |extra: &str| {
        DatasetAdapter::open(
            &host(),
            &first_party("soundfont"),
            &root,
            &format!(r#"{{"file": "fluid-soundfont-gm/FluidR3_GM.sf2"{extra}}}"#),
        )
        .unwrap()
    };
    let (mut plain, mut more) = (
        real(""),
        real(r#", "train_files": ["timgm6mb-soundfont/TimGM6mb.sf2"]"#),
    );
    let mut held_out = std::collections::HashSet::new();
    for split in ["valid", "test"] {
        let (a, b) = (all(&mut plain, split), all(&mut more, split));
        assert_eq!(ids_and_targets(&a), ids_and_targets(&b), "{split}");
        held_out.extend(b.into_iter().map(|e| format!("{:?}", e.audio)));
    }
    let train = all(&mut more, "train");
    let tim: Vec<&Example> = train
        .iter()
        .filter(|e| e.id.starts_with("TimGM6mb.sf2:"))
        .collect();
    assert!(tim.len() > 300, "{} TimGM6mb notes", tim.len());
    for e in tim {
        assert!(
            !held_out.contains(&format!("{:?}", e.audio)),
            "{} sounds like a held-out note",
            e.id
        );
    }
}
