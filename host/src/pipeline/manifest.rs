//! What a trained projector depends on (encoder, LLM, tokenizer, template, mel settings,
//! projector shape) as checksums, and the one check a checkpoint passes before it is used
//! for resuming, captioning or evaluation.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{io, PipelineError, Result};
use crate::config::RunConfig;
use crate::mel::MelSettings;

/// What a checkpoint was trained against; using it against anything else is refused unless
/// the user allows the mismatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub encoder: String,
    pub llm: String,
    pub tokenizer: String,
    pub prompt_template: String,
    pub mel: String,
    pub projector: String,
    /// The encoder hidden states the projector reads (`[encoder] layers`, resolved); absent
    /// for the encoder's output alone, so manifests from before the option still match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_layers: Option<Vec<usize>>,
    /// The LoRA adapters' make (rank, alpha, targets, layers, rsLoRA; not the training-only
    /// dropout and learning rate); absent without `[lora]`, as before the option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
}

impl Manifest {
    /// How many encoder hidden states the projector mixes (1: the encoder's output).
    pub fn encoder_layer_count(&self) -> usize {
        self.encoder_layers.as_ref().map_or(1, Vec::len)
    }

    /// Names of the fields that differ from `other`.
    pub fn differences(&self, other: &Manifest) -> Vec<&'static str> {
        let pairs = [
            ("Whisper encoder weights", &self.encoder, &other.encoder),
            ("LLM weights", &self.llm, &other.llm),
            ("tokenizer", &self.tokenizer, &other.tokenizer),
            (
                "prompt-template plugin",
                &self.prompt_template,
                &other.prompt_template,
            ),
            ("mel settings", &self.mel, &other.mel),
            ("projector config", &self.projector, &other.projector),
        ];
        let mut differs: Vec<&'static str> = pairs
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(n, _, _)| *n)
            .collect();
        if self.encoder_layers != other.encoder_layers {
            differs.push("encoder layer selection ([encoder] layers)");
        }
        if self.lora != other.lora {
            differs.push("LoRA adapters ([lora])");
        }
        differs
    }

    /// Checks that the checkpoint `what` (trained against `self`) fits `current`: an error
    /// naming the differences, or a warning when `allow_mismatch`. `purpose` says what the
    /// checkpoint is about to be used for ("resume", "caption").
    pub fn check(
        &self,
        current: &Manifest,
        what: &Path,
        purpose: &str,
        allow_mismatch: bool,
    ) -> Result<()> {
        let differs = self.differences(current);
        if differs.is_empty() {
            return Ok(());
        }
        let what_differs = differs.join(", ");
        if allow_mismatch {
            tracing::warn!(
                "checkpoint {} was made with a different {what_differs}; used anyway (--allow-mismatch)",
                what.display()
            );
            return Ok(());
        }
        Err(PipelineError::Mismatch {
            path: what.to_path_buf(),
            what: what_differs,
            purpose: purpose.to_string(),
        })
    }
}

/// sha256 over the files' contents, in order, hex.
pub fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f = crate::files::open(p).map_err(io(p, "cannot read"))?;
        loop {
            let n = f.read(&mut buf).map_err(io(p, "cannot read"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// What the encoder cache's entries depend on: the encoder's checksum, the hidden states
/// kept and the log-mel settings (part of a [`Manifest`], found without reading the LLM).
pub struct EncoderIdentity {
    pub encoder: String,
    pub encoder_layers: Option<Vec<usize>>,
    pub mel: String,
}

/// The encoder part of `config`'s manifest.
pub fn encoder_identity_of(config: &RunConfig, mel: &MelSettings) -> Result<EncoderIdentity> {
    let whisper = &config.models.whisper;
    let mut enc_files = crate::models::whisper::safetensors_files(whisper)?;
    enc_files.push(whisper.join("config.json"));
    let whisper_config: crate::models::whisper::WhisperConfig =
        crate::models::weights::read_json_config(&whisper.join("config.json"))?;
    let layers = config
        .encoder
        .layers
        .resolve(whisper_config.encoder_layers)
        .map_err(|reason| {
            PipelineError::Model(crate::models::weights::ModelError::ConfigMismatch {
                source_desc: whisper.display().to_string(),
                reason,
            })
        })?;
    Ok(EncoderIdentity {
        encoder_layers: (layers != [whisper_config.encoder_layers]).then_some(layers),
        encoder: sha256_files(&enc_files)?,
        mel: to_json(mel)?,
    })
}

impl Manifest {
    /// The part of the manifest the encoder cache is keyed by.
    pub fn encoder_identity(&self) -> EncoderIdentity {
        EncoderIdentity {
            encoder: self.encoder.clone(),
            encoder_layers: self.encoder_layers.clone(),
            mel: self.mel.clone(),
        }
    }
}

/// Checksums of everything a trained projector depends on.
pub fn build_manifest(config: &RunConfig, mel: &MelSettings) -> Result<Manifest> {
    let encoder = encoder_identity_of(config, mel)?;
    let llm = &config.models.llm;
    let (llm_hash, tok_hash) = if llm.is_dir() {
        let mut files = crate::models::whisper::safetensors_files(llm)?;
        files.push(llm.join("config.json"));
        (
            sha256_files(&files)?,
            sha256_files(&[llm.join("tokenizer.json")])?,
        )
    } else {
        let h = sha256_files(std::slice::from_ref(llm))?;
        (h.clone(), format!("embedded in {h}"))
    };
    Ok(Manifest {
        encoder_layers: encoder.encoder_layers,
        encoder: encoder.encoder,
        llm: llm_hash,
        tokenizer: tok_hash,
        prompt_template: sha256_files(std::slice::from_ref(&config.plugins.prompt_template))?,
        mel: encoder.mel,
        projector: to_json(&config.projector)?,
        lora: config.lora.as_ref().map(lora_make),
    })
}

/// What of `[lora]` the trained tensors depend on, as a fixed text.
fn lora_make(l: &crate::models::lora::LoraConfig) -> String {
    let mut targets: Vec<&str> = l.targets.iter().map(|t| t.name()).collect();
    targets.sort_unstable();
    let mut layers = l.layers.clone();
    if let Some(v) = layers.as_mut() {
        v.sort_unstable();
    }
    serde_json::json!({
        "rank": l.rank,
        "alpha": l.alpha,
        "targets": targets,
        "layers": layers,
        "use-rslora": l.use_rslora,
    })
    .to_string()
}

fn to_json(v: &impl Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|cause| PipelineError::Json {
        what: "manifest",
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_from_before_encoder_layers_still_match_and_other_layers_do_not() {
        let old = r#"{"encoder":"e","llm":"l","tokenizer":"t","prompt_template":"p","mel":"m","projector":"j"}"#;
        let old: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(old.encoder_layers, None);
        assert_eq!(old.encoder_layer_count(), 1);
        // The encoder's output alone writes the manifest it always wrote.
        assert!(!serde_json::to_string(&old)
            .unwrap()
            .contains("encoder_layers"));
        let mixed = Manifest {
            encoder_layers: Some(vec![0, 2, 4]),
            ..old.clone()
        };
        assert_eq!(mixed.encoder_layer_count(), 3);
        assert_eq!(
            old.differences(&mixed),
            vec!["encoder layer selection ([encoder] layers)"]
        );
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&mixed).unwrap()).unwrap();
        assert_eq!(back, mixed);
        // Without [lora] the manifest says nothing of it; with it, another make differs.
        assert!(!serde_json::to_string(&old).unwrap().contains("lora"));
        let lora = |rank| {
            let c = crate::models::lora::LoraConfig {
                rank,
                ..Default::default()
            };
            Manifest {
                lora: Some(lora_make(&c)),
                ..old.clone()
            }
        };
        assert_eq!(old.differences(&lora(8)), vec!["LoRA adapters ([lora])"]);
        assert_eq!(
            lora(8).differences(&lora(16)),
            vec!["LoRA adapters ([lora])"]
        );
        assert!(lora(8).differences(&lora(8)).is_empty());
    }
}
