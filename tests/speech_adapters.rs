//! Speech dataset adapters. `tuxpaint-stamps` (spoken stamp descriptions): on a small tree
//! built here (file naming, transcripts per language, warnings, caption templates, splits
//! by stamp) and on the real `tuxpaint-stamps-default` tree the set-up fetches. The Python
//! `audio<TAB>text` adapter (`python-tsv`, componentize-py): on a fixture of real clips.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use earshot::plugins::{AudioSource, DatasetAdapter, Example, PluginHost, SandboxLimits};
use earshot_tests::*;

fn host() -> PluginHost {
    PluginHost::new(SandboxLimits::default(), None)
}

fn adapter() -> std::path::PathBuf {
    first_party("tuxpaint_stamps")
}

fn all(ds: &mut DatasetAdapter, split: &str) -> Vec<Example> {
    read_all(ds, split, 100)
}

fn meta<'a>(ex: &'a Example, key: &str) -> Option<&'a str> {
    metadata_value(ex, key)
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// cat: English, French and a language the .txt lacks; apple: Russian only; one name that
/// does not follow the pattern; files that are not clips.
fn small_tree(root: &Path) {
    for clip in [
        "animals/cat_desc.ogg",
        "animals/cat_desc_fr.ogg",
        "animals/cat_desc_xx.ogg",
        "food/fruit/apple_desc_ru.ogg",
        "food/fruit/apple_desc-fr.ogg",
    ] {
        write(root, clip, "not decoded by the adapter");
    }
    write(
        root,
        "animals/cat.txt",
        "A cat.\nde.utf8=Eine Katze.\nfr.utf8=Un chat.\n",
    );
    write(root, "food/fruit/apple.txt", "An apple.\nru.utf8=Яблоко.\n");
    write(root, "animals/cat.png", "");
    write(root, "animals/cat.ogg", "a sound effect, not a description");
}

#[test]
fn small_tree_transcripts_warnings_and_templates() {
    let tmp = tempfile::tempdir().unwrap();
    small_tree(tmp.path());
    let opts = r#"{"test_fraction": 0.0, "valid_fraction": 0.0}"#;
    let mut ds = DatasetAdapter::open(&host(), &adapter(), tmp.path(), opts).unwrap();
    assert_eq!(ds.dataset.splits, vec!["test", "train", "valid"]);
    let w = ds.dataset.warnings.join("\n");
    assert!(
        w.contains("animals/cat_desc_xx.ogg: no xx transcript in animals/cat.txt; left out"),
        "{w}"
    );
    assert!(
        w.contains("food/fruit/apple_desc-fr.ogg: not <name>_desc[_<lang>].ogg; left out"),
        "{w}"
    );
    assert_eq!(ds.dataset.warnings.len(), 2, "{w}");
    let train = all(&mut ds, "train");
    assert!(all(&mut ds, "test").is_empty() && all(&mut ds, "valid").is_empty());
    let got: Vec<(&str, &str, Option<&str>)> = train
        .iter()
        .map(|e| {
            let AudioSource::Path(p) = &e.audio else {
                panic!("{}: not a path", e.id)
            };
            (e.id.as_str(), p.as_str(), e.target.as_deref())
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("animals/cat:en", "animals/cat_desc.ogg", Some("A cat.")),
            (
                "animals/cat:fr",
                "animals/cat_desc_fr.ogg",
                Some("Un chat.")
            ),
            (
                "food/fruit/apple:ru",
                "food/fruit/apple_desc_ru.ogg",
                Some("Яблоко.")
            ),
        ]
    );
    let apple = &train[2];
    assert_eq!(meta(apple, "language"), Some("Russian"));
    assert_eq!(meta(apple, "language_code"), Some("ru"));
    assert_eq!(meta(apple, "stamp"), Some("food/fruit/apple"));
    assert_eq!(meta(apple, "category"), Some("food"));
    assert_eq!(meta(apple, "transcript"), Some("Яблоко."));

    // The speaker-traits caption needs no transcript: the xx clip is kept, named by its code.
    let mut traits = DatasetAdapter::open(
        &host(),
        &adapter(),
        tmp.path(),
        r#"{"test_fraction": 0.0, "valid_fraction": 0.0, "caption": "Spoken in {language}."}"#,
    )
    .unwrap();
    let targets: Vec<Option<String>> = all(&mut traits, "train")
        .into_iter()
        .map(|e| e.target)
        .collect();
    assert_eq!(
        targets,
        vec![
            Some("Spoken in English.".to_string()),
            Some("Spoken in French.".to_string()),
            Some("Spoken in xx.".to_string()),
            Some("Spoken in Russian.".to_string()),
        ]
    );

    // A language filter.
    let mut fr = DatasetAdapter::open(
        &host(),
        &adapter(),
        tmp.path(),
        r#"{"test_fraction": 0.0, "valid_fraction": 0.0, "languages": ["fr"]}"#,
    )
    .unwrap();
    let ids: Vec<String> = all(&mut fr, "train").into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec!["animals/cat:fr"]);

    // Bad options and an empty root are clean errors.
    for (opts, wanted) in [
        (
            r#"{"eval_fraction": 1.0}"#,
            "test_fraction: 1 is not in [0, 1)",
        ),
        (
            r#"{"valid_fraction": -0.1}"#,
            "valid_fraction: -0.1 is not in [0, 1)",
        ),
        (
            r#"{"test_fraction": 0.5, "valid_fraction": 0.5}"#,
            "leave nothing to train on",
        ),
        (r#"{"colour": 1}"#, "unknown field `colour`"),
    ] {
        let err = DatasetAdapter::open(&host(), &adapter(), tmp.path(), opts)
            .err()
            .unwrap_or_else(|| panic!("{opts} accepted"));
        assert!(format!("{err:#}").contains(wanted), "{err:#}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = DatasetAdapter::open(&host(), &adapter(), empty.path(), "")
        .err()
        .expect("an empty root is refused");
    assert!(
        format!("{err:#}").contains("no <name>_desc*.ogg clips"),
        "{err:#}"
    );
}

/// The set-up's tuxpaint-stamps-default tree: the 9 languages with >= 300 clips, every clip
/// of a stamp in one of the three splits whatever its language.
#[test]
fn real_stamps_split_by_stamp() {
    let root = data_dir().join("tuxpaint-stamps-default/stamps");
    assert!(
        root.is_dir(),
        "{}: missing; run scripts/setup.sh",
        root.display()
    );
    let opts = r#"{"caption": "Spoken in {language}."}"#;
    let mut ds = DatasetAdapter::open(&host(), &adapter(), &root, opts).unwrap();
    let train = all(&mut ds, "train");
    let valid = all(&mut ds, "valid");
    let eval = all(&mut ds, "test");
    let mut per_language: BTreeMap<String, usize> = BTreeMap::new();
    for e in train.iter().chain(&valid).chain(&eval) {
        *per_language
            .entry(meta(e, "language_code").unwrap().to_string())
            .or_default() += 1;
    }
    let big: BTreeSet<&str> = per_language
        .iter()
        .filter(|(_, n)| **n >= 300)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        big,
        BTreeSet::from(["be", "bg", "ca", "da", "el", "es", "fr", "ro", "ru"]),
        "{per_language:?}"
    );
    let stamps = |xs: &[Example]| -> BTreeSet<String> {
        xs.iter()
            .map(|e| meta(e, "stamp").unwrap().to_string())
            .collect()
    };
    for (a, b) in [(&train, &valid), (&train, &eval), (&valid, &eval)] {
        assert!(stamps(a).is_disjoint(&stamps(b)));
    }
    let total = (train.len() + valid.len() + eval.len()) as f64;
    let share = eval.len() as f64 / total;
    assert!((0.15..0.25).contains(&share), "test share {share}");
    let share = valid.len() as f64 / total;
    assert!((0.06..0.14).contains(&share), "valid share {share}");
    // Every clip the adapter names exists beneath the root.
    for e in train.iter().chain(&valid).chain(&eval).step_by(97) {
        let AudioSource::Path(p) = &e.audio else {
            panic!("{}: not a path", e.id)
        };
        assert!(root.join(p).is_file(), "{p}");
    }
}

/// Three real French clips of the set-up's tree, with their transcripts, in `root`; the
/// transcripts as the adapter should return them.
fn real_tsv_fixture(root: &Path) -> Vec<(String, String)> {
    let stamps = data_dir().join("tuxpaint-stamps-default/stamps");
    assert!(
        stamps.is_dir(),
        "{}: missing; run scripts/setup.sh",
        stamps.display()
    );
    let mut rows = Vec::new();
    for (stamp, text) in [
        ("animals/marsupials/kangaroo", "Un kangourou rouge."),
        ("animals/birds/blackbird", "Un merle."),
        ("food/fruit/apple_fuji", "Une pomme “Fuji”."),
    ] {
        let clip = stamps.join(format!("{stamp}_desc_fr.ogg"));
        let name = format!("clips/{}.ogg", stamp.rsplit('/').next().unwrap());
        std::fs::create_dir_all(root.join("clips")).unwrap();
        std::fs::copy(&clip, root.join(&name)).unwrap();
        let txt = std::fs::read_to_string(stamps.join(format!("{stamp}.txt"))).unwrap();
        let said = txt
            .lines()
            .find_map(|l| l.strip_prefix("fr.utf8="))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(said, text, "{stamp}.txt");
        rows.push((name, said));
    }
    rows
}

#[test]
fn python_tsv_adapter_on_real_clips() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = real_tsv_fixture(tmp.path());
    let mut tsv = String::from("# audio\ttext\n");
    for (audio, text) in &rows {
        tsv.push_str(&format!("{audio}\t{text}\n"));
    }
    tsv.push_str("no tab on this line\n");
    tsv.push_str("clips/missing.ogg\tNot here.\n");
    tsv.push_str("../outside.ogg\tEscapes.\n\n");
    std::fs::write(tmp.path().join("train.tsv"), &tsv).unwrap();
    std::fs::write(
        tmp.path().join("eval.tsv"),
        format!("{}\t{}\n", rows[0].0, rows[0].1),
    )
    .unwrap();
    let plugin = python_plugin_named("python-tsv");
    let mut ds = DatasetAdapter::open(&host(), &plugin, tmp.path(), "").unwrap();
    assert_eq!(ds.dataset.splits, vec!["eval", "train"]);
    let n = rows.len() + 2;
    let w = ds.dataset.warnings.join("\n");
    assert!(
        w.contains(&format!(
            "train.tsv:{n}: no tab between audio and text; skipped"
        )),
        "{w}"
    );
    assert!(
        w.contains(&format!(
            "train.tsv:{}: audio file clips/missing.ogg not found; skipped",
            n + 1
        )),
        "{w}"
    );
    assert!(
        w.contains(&format!(
            "train.tsv:{}: audio path '../outside.ogg' leaves the dataset root; skipped",
            n + 2
        )),
        "{w}"
    );
    assert_eq!(ds.dataset.warnings.len(), 3, "{w}");
    let train = all(&mut ds, "train");
    let got: Vec<(String, String)> = train
        .iter()
        .map(|e| {
            let AudioSource::Path(p) = &e.audio else {
                panic!("{}: not a path", e.id)
            };
            (p.clone(), e.target.clone().unwrap())
        })
        .collect();
    assert_eq!(got, rows);
    assert_eq!(train[0].id, "train:2");
    assert_eq!(meta(&train[0], "transcript"), Some(rows[0].1.as_str()));
    // The clips decode: real Ogg Vorbis speech of a second or more.
    for (audio, _) in &rows {
        let out = earshot([
            "audio-info",
            "--json",
            &tmp.path().join(audio).display().to_string(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&expect_success(&out)).unwrap();
        assert!(v["duration_s"].as_f64().unwrap() > 0.5, "{v}");
    }
    let err = DatasetAdapter::open(&host(), &plugin, tmp.path(), r#"{"colour": 1}"#)
        .err()
        .expect("unknown option refused");
    assert!(
        format!("{err:#}").contains("unknown field(s) ['colour']"),
        "{err:#}"
    );
}

/// The LibriSpeech-layout adapter on tests/fixtures/librispeech (real English speech in
/// LibriSpeech's folders and FLAC; scripts/make-speech-fixtures.sh).
#[test]
fn librispeech_layout_on_real_clips() {
    let root = fixture("librispeech");
    let plugin = first_party("librispeech");
    let mut ds = DatasetAdapter::open(&host(), &plugin, &root, "").unwrap();
    assert_eq!(ds.dataset.splits, vec!["dev-clean", "train-clean-5"]);
    assert_eq!(
        ds.dataset.warnings,
        vec![
            "dev-clean/1001/2002/1001-2002.trans.txt:4: audio dev-clean/1001/2002/1001-2002-0099.flac not found; skipped"
        ]
    );
    let dev = all(&mut ds, "dev-clean");
    let got = ids_and_targets(&dev);
    assert_eq!(
        got,
        vec![
            ("1001-2002-0000", Some("A FROG")),
            ("1001-2002-0001", Some("A CROW")),
            ("1001-2002-0002", Some("A DUCK")),
        ]
    );
    assert_eq!(meta(&dev[0], "speaker"), Some("1001"));
    assert_eq!(meta(&dev[0], "chapter"), Some("2002"));
    let AudioSource::Path(p) = &dev[1].audio else {
        panic!("not a path")
    };
    assert_eq!(p, "dev-clean/1001/2002/1001-2002-0001.flac");
    let out = earshot(["audio-info", "--json", &root.join(p).display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&expect_success(&out)).unwrap();
    assert_eq!(
        (v["codec"].as_str(), v["sample_rate"].as_u64()),
        (Some("flac"), Some(16000))
    );

    // Splits named by the options, lower-cased targets; a split folder as the root.
    let mut renamed = DatasetAdapter::open(
        &host(),
        &plugin,
        &root,
        r#"{"splits": {"train": "train-clean-5", "test": "dev-clean"}, "lowercase": true}"#,
    )
    .unwrap();
    assert_eq!(renamed.dataset.splits, vec!["test", "train"]);
    let train = all(&mut renamed, "train");
    assert_eq!(train.len(), 2);
    assert_eq!(train[0].target.as_deref(), Some("a brown hen"));
    let mut one = DatasetAdapter::open(&host(), &plugin, &root.join("train-clean-5"), "").unwrap();
    assert_eq!(one.dataset.splits, vec!["all"]);
    assert_eq!(all(&mut one, "all").len(), 2);
    let err = DatasetAdapter::open(&host(), &plugin, &root, r#"{"splits": {"x": "../etc"}}"#)
        .err()
        .expect("a split outside the root is refused");
    assert!(
        format!("{err:#}").contains("must be a folder inside the dataset root"),
        "{err:#}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = DatasetAdapter::open(&host(), &plugin, empty.path(), "")
        .err()
        .expect("an empty root is refused");
    assert!(
        format!("{err:#}").contains("no LibriSpeech split folders"),
        "{err:#}"
    );
}

fn asterisk() -> std::path::PathBuf {
    first_party("asterisk_sounds")
}

/// A PCM WAV file (8 kHz, 16-bit, mono) of `seconds` of a tone, distinct per `pitch`: unit-test
/// audio, only its header and bytes matter to the adapter.
fn wav(seconds: f64, pitch: f64) -> Vec<u8> {
    let rate = 8000u32;
    let n = (seconds * rate as f64) as usize;
    let mut data = Vec::with_capacity(n * 2);
    for i in 0..n {
        let v = (i as f64 * pitch * std::f64::consts::TAU / rate as f64).sin() * 8000.0;
        data.extend_from_slice(&(v as i16).to_le_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

/// An Asterisk-style tree: a list with a comment, notes, a bracketed symbol, a
/// parenthesised remark, a name without a clip, a clip without a name, a clip over the length
/// cap, a copy of another clip's audio, a repeated sentence and two near-identical menus.
fn asterisk_tree(root: &Path) {
    let clips: [(&str, f64, f64); 12] = [
        ("sounds/digits/7", 0.6, 300.0),
        ("sounds/letters/at", 0.5, 310.0),
        ("sounds/vm-intro", 2.0, 320.0),
        ("sounds/beep", 0.2, 330.0),
        ("sounds/silence/1", 1.0, 0.0),
        ("sounds/unlisted", 1.0, 340.0),
        ("sounds/demo-long", 31.0, 350.0),
        ("sounds/thanks-a", 0.8, 360.0),
        ("sounds/thanks-b", 0.9, 370.0),
        ("sounds/menu-1", 3.0, 380.0),
        ("sounds/menu-2", 3.1, 390.0),
        ("sounds/copy-of-7", 0.6, 300.0),
    ];
    for (name, seconds, pitch) in clips {
        let p = root.join(format!("{name}.wav"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, wav(seconds, pitch)).unwrap();
    }
    write(
        root,
        "core-sounds-xx.txt",
        "; Core Asterisk Sounds\n\
         \n\
         digits/7: seven\n\
         letters/at: at [@]\n\
         vm-intro: Please leave your message after the tone. (simple tone sound plays)\n\
         beep: [this is a simple beep tone]\n\
         silence/1: (1 second of silence)\n\
         missing-clip: Goodbye.\n\
         demo-long: A very long demonstration.\n\
         thanks-a: Thank you.\n\
         thanks-b: Thank you!\n\
         menu-1: Please press 1 to mute or unmute yourself, or 8 to exit.\n\
         menu-2: Please press 1 to mute or unmute yourself, or 8 for more options.\n\
         copy-of-7: the digit seven\n\
         this line has no colon\n",
    );
}

#[test]
fn asterisk_small_tree_notes_warnings_and_content_groups() {
    let tmp = tempfile::tempdir().unwrap();
    asterisk_tree(tmp.path());
    let opts = r#"{"audio_dir": "sounds", "test_fraction": 0.0, "valid_fraction": 0.0}"#;
    let mut ds = DatasetAdapter::open(&host(), &asterisk(), tmp.path(), opts).unwrap();
    let w = ds.dataset.warnings.join("\n");
    for expected in [
        "line 15: not `name: text`",
        "2 entries are notes, not speech; left out: beep, silence/1",
        "1 listed names have no .wav clip; left out: missing-clip",
        "1 clips are longer than max_seconds 30; left out: demo-long (31.0 s)",
        "1 clips are not in core-sounds-xx.txt; left out: unlisted",
    ] {
        assert!(w.contains(expected), "{expected:?} not in:\n{w}");
    }
    assert_eq!(ds.dataset.warnings.len(), 5, "{w}");
    let train = all(&mut ds, "train");
    let said: BTreeMap<&str, &str> = train
        .iter()
        .map(|e| (e.id.as_str(), meta(e, "transcript").unwrap()))
        .collect();
    assert_eq!(
        said,
        BTreeMap::from([
            ("copy-of-7", "the digit seven"),
            ("digits/7", "seven"),
            ("letters/at", "at"),
            (
                "menu-1",
                "Please press 1 to mute or unmute yourself, or 8 to exit."
            ),
            (
                "menu-2",
                "Please press 1 to mute or unmute yourself, or 8 for more options."
            ),
            ("thanks-a", "Thank you."),
            ("thanks-b", "Thank you!"),
            ("vm-intro", "Please leave your message after the tone."),
        ])
    );
    let seven = train.iter().find(|e| e.id == "digits/7").unwrap();
    assert_eq!(seven.target.as_deref(), Some("seven"));
    assert_eq!(meta(seven, "folder"), Some("digits"));
    assert_eq!(meta(seven, "language_code"), Some("xx"));
    assert_eq!(meta(seven, "seconds"), Some("0.600"));
    let intro = train.iter().find(|e| e.id == "vm-intro").unwrap();
    assert_eq!(meta(intro, "folder"), Some("prompts"));
    // The list's order is kept.
    assert_eq!(train[0].id, "digits/7");
    let AudioSource::Path(p) = &seven.audio else {
        panic!("not a path")
    };
    assert_eq!(p, "sounds/digits/7.wav");

    // With most of the clips held out, each content group still falls on one side: the
    // same audio (digits/7, copy-of-7), the same normalised sentence (thanks-a, thanks-b),
    // the same first six words of a long sentence (menu-1, menu-2).
    let mut joined = 0;
    for seed in 0..40 {
        let opts = format!(
            r#"{{"audio_dir": "sounds", "test_fraction": 0.4, "valid_fraction": 0.3, "seed": {seed}}}"#
        );
        let mut ds = DatasetAdapter::open(&host(), &asterisk(), tmp.path(), &opts).unwrap();
        let mut side: BTreeMap<String, &str> = BTreeMap::new();
        for split in ["train", "valid", "test"] {
            for e in all(&mut ds, split) {
                side.insert(e.id, split);
            }
        }
        assert_eq!(side.len(), 8);
        for (a, b) in [
            ("digits/7", "copy-of-7"),
            ("thanks-a", "thanks-b"),
            ("menu-1", "menu-2"),
        ] {
            assert_eq!(side[a], side[b], "seed {seed}: {a} and {b} split apart");
        }
        if side["digits/7"] != side["letters/at"] {
            joined += 1;
        }
    }
    // Unrelated clips do move apart (the grouping is not everything in one group).
    assert!(joined > 5, "{joined}");
}

#[test]
fn asterisk_bad_options_and_roots_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    asterisk_tree(tmp.path());
    for (opts, expected) in [
        (
            r#"{"audio_dir": "../etc"}"#,
            "audio_dir: \"../etc\" is not a plain path",
        ),
        (
            r#"{"transcripts": "/etc/passwd"}"#,
            "transcripts: \"/etc/passwd\" is not a plain path",
        ),
        (
            r#"{"audio_dir": "sounds", "max_seconds": 0}"#,
            "max_seconds: 0 is not a positive number",
        ),
        (
            r#"{"audio_dir": "sounds", "test_fraction": 0.6, "valid_fraction": 0.4}"#,
            "leave nothing to train on",
        ),
        (
            r#"{"audio_dir": "sounds", "speaker": "x"}"#,
            "unknown field `speaker`",
        ),
        (
            r#"{}"#,
            "no entry of core-sounds-xx.txt has a .wav clip under the root",
        ),
        (
            r#"{"audio_dir": "sounds", "transcripts": "nope.txt"}"#,
            "nope.txt",
        ),
    ] {
        let err = DatasetAdapter::open(&host(), &asterisk(), tmp.path(), opts)
            .err()
            .unwrap_or_else(|| panic!("{opts} was accepted"));
        assert!(format!("{err:#}").contains(expected), "{opts}: {err:#}");
    }
    write(tmp.path(), "core-sounds-yy.txt.gz", "");
    let err = DatasetAdapter::open(
        &host(),
        &asterisk(),
        tmp.path(),
        r#"{"audio_dir": "sounds"}"#,
    )
    .err()
    .expect("two lists are ambiguous");
    assert!(
        format!("{err:#}").contains("several transcript lists at the dataset root (core-sounds-xx.txt, core-sounds-yy.txt.gz)"),
        "{err:#}"
    );
    // A .gz list that is not gzip is an error naming it, not a panic or an empty dataset.
    let err = DatasetAdapter::open(
        &host(),
        &asterisk(),
        tmp.path(),
        r#"{"audio_dir": "sounds", "transcripts": "core-sounds-yy.txt.gz"}"#,
    )
    .err()
    .expect("an empty .gz is refused");
    assert!(
        format!("{err:#}").contains("core-sounds-yy.txt.gz"),
        "{err:#}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = DatasetAdapter::open(&host(), &asterisk(), empty.path(), "")
        .err()
        .expect("an empty root is refused");
    assert!(
        format!("{err:#}").contains("no core-sounds-<lang>.txt[.gz] at the dataset root"),
        "{err:#}"
    );
}

/// The set-up's asterisk-core-sounds-en tree (the gzipped list as Debian ships it): every
/// spoken prompt of one speaker, the notes and over-long demos left out, no recording or
/// normalised transcript on two sides.
#[test]
fn asterisk_real_english_prompts() {
    let root = data_dir().join("asterisk-core-sounds-en");
    assert!(
        root.join("core-sounds-en.txt.gz").is_file(),
        "{}: missing; run scripts/setup.sh",
        root.display()
    );
    let opts = r#"{"audio_dir": "en_US_f_Allison"}"#;
    let mut ds = DatasetAdapter::open(&host(), &asterisk(), &root, opts).unwrap();
    let w = ds.dataset.warnings.join("\n");
    // 568 clips, 569 listed names: 15 notes (beeps, tones, silences), one name without a
    // clip (pls-try-call-later) and three demos over 30 s.
    assert!(w.contains("15 entries are notes, not speech"), "{w}");
    assert!(
        w.contains("1 listed names have no .wav clip; left out: pls-try-call-later"),
        "{w}"
    );
    assert!(w.contains("3 clips are longer than max_seconds 30; left out: demo-congrats (30.3 s), demo-instruct (73.3 s), priv-callee-options (31.1 s)"), "{w}");
    // Every clip is listed (the notes' clips too: they are left out as notes).
    assert!(!w.contains("not in core-sounds-en.txt.gz"), "{w}");
    assert_eq!(ds.dataset.warnings.len(), 3, "{w}");
    let train = all(&mut ds, "train");
    let valid = all(&mut ds, "valid");
    let test = all(&mut ds, "test");
    let total = train.len() + valid.len() + test.len();
    assert_eq!(total, 568 - 15 - 3, "{w}");
    for e in train.iter().chain(&valid).chain(&test) {
        assert_eq!(meta(e, "language_code"), Some("en"));
        let t = meta(e, "transcript").unwrap();
        assert!(!t.contains('[') && !t.contains('('), "{}: {t}", e.id);
        assert_eq!(e.target.as_deref(), Some(t));
    }
    let by_id: BTreeMap<&str, &str> = train
        .iter()
        .chain(&valid)
        .chain(&test)
        .map(|e| (e.id.as_str(), meta(e, "transcript").unwrap()))
        .collect();
    assert_eq!(by_id["digits/7"], "seven");
    assert_eq!(by_id["letters/at"], "at");
    assert_eq!(
        by_id["vm-intro"],
        "Please leave your message after the tone. When done hang up or press the pound key."
    );
    let normal = |xs: &[Example]| -> BTreeSet<String> {
        xs.iter()
            .map(|e| {
                meta(e, "transcript")
                    .unwrap()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || c.is_whitespace())
                    .collect::<String>()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    };
    let bytes = |xs: &[Example]| -> BTreeSet<Vec<u8>> {
        xs.iter()
            .map(|e| {
                let AudioSource::Path(p) = &e.audio else {
                    panic!("{}: not a path", e.id)
                };
                std::fs::read(root.join(p)).unwrap()
            })
            .collect()
    };
    for (a, b) in [(&train, &valid), (&train, &test), (&valid, &test)] {
        assert!(normal(a).is_disjoint(&normal(b)));
        assert!(bytes(a).is_disjoint(&bytes(b)));
    }
    let share = test.len() as f64 / total as f64;
    assert!((0.14..0.26).contains(&share), "test share {share}");
    let share = valid.len() as f64 / total as f64;
    assert!((0.05..0.15).contains(&share), "valid share {share}");
}
