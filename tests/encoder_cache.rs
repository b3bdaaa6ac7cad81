//! The encoder-output cache, end to end through `earshot train` under a fresh EARSHOT_HOME:
//! a second epoch/run takes every clip from it; editing a clip, changing the mel settings or
//! swapping the Whisper weights or the encoder hidden states kept re-encodes what changed; a
//! damaged entry is recomputed.

use std::path::{Path, PathBuf};

use earshot_tests::*;

/// (encoded, from the cache) as `train` reports them.
fn encodings(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains("encoder: "))
        .unwrap_or_else(|| panic!("no encoder line in: {stderr}"));
    let after = &line[line.find("encoder: ").unwrap() + 9..];
    let nums: Vec<usize> = after
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

struct Setup {
    _dir: tempfile::TempDir,
    home: PathBuf,
    data: PathBuf,
    runs: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let home = fresh_home(dir.path());
    let data = dir.path().join("tones");
    std::fs::create_dir_all(data.join("clips")).unwrap();
    let src = repo_root().join("configs/data/tones");
    std::fs::copy(src.join("train.jsonl"), data.join("train.jsonl")).unwrap();
    for e in std::fs::read_dir(src.join("clips")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join("clips").join(e.file_name())).unwrap();
    }
    let runs = dir.path().join("runs");
    Setup {
        _dir: dir,
        home,
        data,
        runs,
    }
}

impl Setup {
    /// One training step on the copied clips; returns (encoded, cached).
    fn train(&self, run: &str, sets: &[String]) -> (usize, usize) {
        let mut cmd = earshot_command();
        cmd.env("EARSHOT_HOME", &self.home)
            .arg("train")
            .arg(repo_root().join("configs/cpu-smollm2-tones.toml"))
            .args(["--set", "train.steps=1"])
            .arg("--set")
            .arg(format!("data.root=\"{}\"", self.data.display()))
            .arg("--set")
            .arg(format!(
                "train.run-dir=\"{}\"",
                self.runs.join(run).display()
            ));
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        expect_success(&out);
        encodings(&String::from_utf8_lossy(&out.stderr))
    }

    fn entries(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.home.join("cache/encoder"), &mut v);
        v.sort();
        v
    }
}

#[test]
fn the_cache_serves_what_is_unchanged_and_recomputes_what_changed() {
    let s = setup();
    assert_eq!(s.train("a", &[]), (8, 0), "a cold cache encodes every clip");
    assert_eq!(s.entries().len(), 8);
    assert_eq!(s.train("b", &[]), (0, 8), "a warm cache encodes nothing");

    // Damaged entries (truncated; a valid file holding the wrong shape) are recomputed and
    // rewritten whole.
    let entries = s.entries();
    let sizes: Vec<usize> = entries
        .iter()
        .map(|p| std::fs::read(p).unwrap().len())
        .collect();
    let bytes = std::fs::read(&entries[0]).unwrap();
    std::fs::write(&entries[0], &bytes[..bytes.len() / 2]).unwrap();
    let wrong = std::collections::HashMap::from([(
        "encoded".to_string(),
        candle_core::Tensor::zeros(
            (1, 10, 384),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    )]);
    candle_core::safetensors::save(&wrong, &entries[1]).unwrap();
    assert_eq!(s.train("b2", &[]), (2, 6));
    for (p, size) in entries.iter().zip(&sizes).take(2) {
        assert_eq!(
            std::fs::read(p).unwrap().len(),
            *size,
            "{} not rewritten",
            p.display()
        );
    }

    // Edit one clip: only it is encoded again.
    let clip = s.data.join("clips/three.wav");
    let mut r = hound::WavReader::open(&clip).unwrap();
    let spec = r.spec();
    let samples: Vec<i16> = r.samples::<i16>().map(|x| x.unwrap() / 2).collect();
    let mut w = hound::WavWriter::create(&clip, spec).unwrap();
    for x in samples {
        w.write_sample(x).unwrap();
    }
    w.finalize().unwrap();
    assert_eq!(s.train("c", &[]), (1, 7));

    // Other mel settings: every clip again.
    assert_eq!(s.train("d", &["mel.padding=\"trailing\"".into()]), (8, 0));

    // Other Whisper weights (same shapes, one value changed): every clip again.
    let whisper = s.home.join("whisper-edited");
    std::fs::create_dir_all(&whisper).unwrap();
    let src = default_whisper();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        if f.path().is_file() {
            std::fs::copy(f.path(), whisper.join(f.file_name())).unwrap();
        }
    }
    let file = whisper.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let name = "model.encoder.layers.0.fc1.bias";
    let edited = (&t[name] + 1e-3).unwrap();
    t.insert(name.into(), edited);
    candle_core::safetensors::save(&t, &file).unwrap();
    let set = format!("models.whisper=\"{}\"", whisper.display());
    assert_eq!(s.train("e", &[set]), (8, 0));

    // Other encoder hidden states (`[encoder] layers`): every clip again, then the cache.
    let all = "encoder.layers=\"all\"".to_string();
    assert_eq!(s.train("f", std::slice::from_ref(&all)), (8, 0));
    assert_eq!(s.train("g", &[all]), (0, 8));
    assert_eq!(
        s.train("h", &["encoder.layers=[4]".into()]),
        (0, 8),
        "[4] is \"last\""
    );
}
