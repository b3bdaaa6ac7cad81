//! On-disk cache of frozen-encoder outputs. The encoder never changes, so its output for a
//! clip is computed once and reused across epochs and runs. Content-addressed by the decoded
//! samples, the segment, the mel settings, the encoder weights' checksum, the encoder code's
//! output revision and the device/dtype it ran in; entries are
//! written to a temp file and renamed, so concurrent runs never see a partial entry.

use std::path::{Path, PathBuf};

use super::error::{io, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

pub struct EncoderCache {
    dir: PathBuf,
    /// Identifies the encoder weights and the mel settings.
    context: String,
}

/// What the cached outputs depend on besides the clip and the mel settings: the encoder
/// weights (`weights_checksum`), the encoder code's output revision, and the device and
/// dtype it ran in (a bf16 GPU run and an f32 CPU run differ by far more than noise).
pub fn encoder_identity(weights_checksum: &str, rt: &crate::models::Runtime) -> String {
    format!(
        "{weights_checksum}|encoder code r{}|{:?} {:?}",
        crate::models::whisper::OUTPUT_REVISION,
        rt.device.location(),
        rt.dtype
    )
}

impl EncoderCache {
    pub fn new(dir: PathBuf, encoder_hash: &str, mel_settings: &str) -> Self {
        Self {
            dir,
            context: format!("{encoder_hash}|{mel_settings}"),
        }
    }

    /// `$EARSHOT_HOME/cache/encoder`.
    pub fn default_dir() -> PathBuf {
        crate::files::earshot_home().join("cache/encoder")
    }

    pub fn key(&self, samples: &[f32], segment: (Option<f64>, Option<f64>)) -> String {
        let mut h = Sha256::new();
        h.update(self.context.as_bytes());
        h.update(format!("{segment:?}").as_bytes());
        for s in samples {
            h.update(s.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The key of 30 s window `w` of the clip whose key is `clip_key` (window 0 keeps the
    /// clip's key, so caches written before long clips had windows stay valid).
    pub fn window_key(clip_key: &str, w: usize) -> String {
        if w == 0 {
            return clip_key.to_string();
        }
        let mut h = Sha256::new();
        h.update(format!("{clip_key}|window {w}").as_bytes());
        hex::encode(h.finalize())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// The entry for `key` if it holds a finite tensor of shape `dims`; a damaged entry
    /// (unreadable, another shape, non-finite values) is reported and treated as absent, so
    /// the caller recomputes and rewrites it.
    pub fn get(&self, key: &str, dims: &[usize], device: &Device) -> Option<Tensor> {
        let p = self.path(key);
        let bytes = std::fs::read(&p).ok()?;
        let checked = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| e.to_string())
            .and_then(|mut m| {
                m.remove("encoded")
                    .ok_or_else(|| "no tensor `encoded`".into())
            })
            .and_then(|t| {
                if t.dims() != dims {
                    return Err(format!("shape {:?}, expected {dims:?}", t.dims()));
                }
                match crate::models::weights::count_non_finite("encoded", &t) {
                    Ok(None) => Ok(t),
                    Ok(Some(bad)) => Err(format!("non-finite values: {bad}")),
                    Err(e) => Err(e.to_string()),
                }
            });
        match checked {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "ignoring a damaged encoder cache entry {} ({e}); recomputing it",
                    p.display()
                );
                None
            }
        }
    }

    pub fn put(&self, key: &str, encoded: &Tensor) -> Result<()> {
        let p = self.path(key);
        let dir = p.parent().expect("entry has a folder");
        std::fs::create_dir_all(dir).map_err(io(dir, "cannot create"))?;
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir, "cannot write"))?;
        let map = std::collections::HashMap::from([("encoded".to_string(), encoded.clone())]);
        candle_core::safetensors::save(&map, tmp.path())?;
        tmp.persist(&p)
            .map_err(|e| io(&p, "cannot write")(e.error))?;
        Ok(())
    }
}

/// Files under `dir` (recursively) with size and modification time.
pub fn entries(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(entries(&p));
        } else if let Ok(m) = e.metadata() {
            out.push((p, m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Runtime;

    #[test]
    fn keys_depend_on_weights_dtype_and_segment() {
        let f32_rt = Runtime::cpu();
        let f64_rt = Runtime {
            dtype: candle_core::DType::F64,
            ..Runtime::cpu()
        };
        let key = |weights: &str, rt: &Runtime, seg: (Option<f64>, Option<f64>)| {
            EncoderCache::new(PathBuf::from("x"), &encoder_identity(weights, rt), "mel80")
                .key(&[0.0, 0.5], seg)
        };
        let base = key("w1", &f32_rt, (None, None));
        assert_eq!(base, key("w1", &Runtime::cpu(), (None, None)));
        assert_ne!(base, key("w2", &f32_rt, (None, None)));
        assert_ne!(base, key("w1", &f64_rt, (None, None)));
        assert_ne!(base, key("w1", &f32_rt, (Some(1.0), None)));
        assert!(encoder_identity("w1", &f32_rt)
            .contains(&format!("r{}", crate::models::whisper::OUTPUT_REVISION)));
    }
}
