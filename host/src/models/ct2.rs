//! `earshot import ct2`: a CTranslate2 Whisper model (`model.bin`, spec version 6, as used by
//! faster-whisper) to a Hugging Face layout folder (`model.safetensors` + `config.json`, plus
//! the tokenizer), splitting the fused attention projections. Weights keep their dtype.
//!
//! model.bin: u32 version | string spec name | u32 spec revision | u32 n_vars |
//! per var: string name, u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, bytes |
//! u32 n_aliases | per alias: string alias, string target. Strings are u16 length (counting a
//! trailing NUL) + bytes. Little-endian, no alignment.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::weights::{ModelError, Result};

/// One variable of a CTranslate2 model.
#[derive(Debug, Clone)]
pub struct Ct2Var {
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
}

/// The parsed `model.bin`.
#[derive(Debug)]
pub struct Ct2Model {
    pub spec: String,
    pub vars: BTreeMap<String, Ct2Var>,
    pub aliases: Vec<(String, String)>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: self.path.to_path_buf(),
            format: "CTranslate2 model.bin",
            reason: format!("{} (at byte {})", reason.into(), self.pos),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.err(format!(
                "file ends early: need {n} more bytes, {} left",
                self.data.len() - self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let bytes = self.take(n)?;
        let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("a name is not valid UTF-8"))
    }
}

fn dtype_of(code: u8) -> Option<(DType, usize)> {
    Some(match code {
        0 => (DType::F32, 4),
        1 => (DType::I64, 0), // i8: not used by float Whisper checkpoints; refused below
        2 => (DType::I16, 2),
        3 => (DType::I32, 0),
        4 => (DType::F16, 2),
        5 => (DType::BF16, 2),
        _ => return None,
    })
}

impl Ct2Model {
    pub fn read(path: &Path) -> Result<Self> {
        let data = crate::files::read(path).map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut r = Reader {
            data: &data,
            pos: 0,
            path,
        };
        let version = r.u32()?;
        if version != 6 {
            return Err(r.err(format!(
                "binary version {version} is not supported (only version 6)"
            )));
        }
        let spec = r.string()?;
        let _revision = r.u32()?;
        let n = r.u32()? as usize;
        let mut vars = BTreeMap::new();
        for _ in 0..n {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let dims = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let code = r.u8()?;
            let n_bytes = r.u32()? as usize;
            let bytes = r.take(n_bytes)?.to_vec();
            let (dtype, size) = match dtype_of(code) {
                Some((dt, size)) if size > 0 => (dt, size),
                _ => {
                    // Quantized (int8) or unknown: keep the bytes for scalars only.
                    if dims.is_empty() {
                        (DType::U8, 1)
                    } else {
                        return Err(r.err(format!(
                            "variable `{name}` has dtype code {code}: quantized (int8) models are not supported, \
                             convert with --quantization float16 or float32"
                        )));
                    }
                }
            };
            let elems: usize = dims.iter().product();
            if !dims.is_empty() && elems * size != n_bytes {
                return Err(r.err(format!(
                    "variable `{name}`: {n_bytes} bytes for shape {dims:?}"
                )));
            }
            vars.insert(name, Ct2Var { dims, dtype, bytes });
        }
        let n_alias = r.u32()? as usize;
        let mut aliases = Vec::with_capacity(n_alias);
        for _ in 0..n_alias {
            aliases.push((r.string()?, r.string()?));
        }
        Ok(Self {
            spec,
            vars,
            aliases,
        })
    }

    fn var(&self, path: &Path, name: &str) -> Result<&Ct2Var> {
        self.vars
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_desc: path.display().to_string(),
                name: name.to_string(),
            })
    }

    fn scalar_int(&self, path: &Path, name: &str) -> Result<usize> {
        let v = self.var(path, name)?;
        let bad = |reason: String| ModelError::Format {
            path: path.to_path_buf(),
            format: "CTranslate2 model.bin",
            reason,
        };
        // CTranslate2 stores integer scalars as signed int8/int16/int32.
        let value: i64 = match v.bytes.len() {
            1 => i64::from(v.bytes[0] as i8),
            2 => i64::from(i16::from_le_bytes([v.bytes[0], v.bytes[1]])),
            4 => i64::from(i32::from_le_bytes([
                v.bytes[0], v.bytes[1], v.bytes[2], v.bytes[3],
            ])),
            n => return Err(bad(format!("scalar `{name}` has {n} bytes"))),
        };
        usize::try_from(value).map_err(|_| {
            bad(format!(
                "scalar `{name}` is {value}; a count must not be negative"
            ))
        })
    }

    fn count_layers(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                self.vars
                    .keys()
                    .any(|k| k.starts_with(&format!("{prefix}/layer_{i}/")))
            })
            .count()
    }
}

/// Hugging Face Whisper tensors made from a CTranslate2 model's variables.
struct Converter<'a> {
    model: &'a Ct2Model,
    /// model.bin, for errors.
    bin: &'a Path,
    out: HashMap<String, Tensor>,
}

impl Converter<'_> {
    fn var(&self, name: &str) -> Result<&Ct2Var> {
        self.model.var(self.bin, name)
    }

    /// `v` as a tensor, or its rows `start..start + len`.
    fn tensor(v: &Ct2Var, rows: Option<(usize, usize)>) -> Result<Tensor> {
        let t = Tensor::from_raw_buffer(&v.bytes, v.dtype, &v.dims, &Device::Cpu)?;
        Ok(match rows {
            Some((start, len)) => t.narrow(0, start, len)?.contiguous()?,
            None => t,
        })
    }

    fn put(&mut self, hf: &str, ct: &str) -> Result<()> {
        let t = Self::tensor(self.var(ct)?, None)?;
        self.out.insert(hf.to_string(), t);
        Ok(())
    }

    /// A Linear layer: weight and bias.
    fn linear(&mut self, ct: &str, hf: &str) -> Result<()> {
        self.put(&format!("{hf}.weight"), &format!("{ct}/weight"))?;
        self.put(&format!("{hf}.bias"), &format!("{ct}/bias"))
    }

    /// A LayerNorm: CTranslate2's gamma and beta.
    fn norm(&mut self, ct: &str, hf: &str) -> Result<()> {
        self.put(&format!("{hf}.weight"), &format!("{ct}/gamma"))?;
        self.put(&format!("{hf}.bias"), &format!("{ct}/beta"))
    }

    /// A fused projection split along rows into parts; k projections have no bias in HF
    /// Whisper, so CTranslate2 stores zeros there, which we check.
    fn split(&mut self, ct: &str, parts: &[(String, bool)]) -> Result<()> {
        let w = self.var(&format!("{ct}/weight"))?;
        let b = self.var(&format!("{ct}/bias"))?;
        let rows = w.dims[0] / parts.len();
        let mut made = Vec::new();
        for (i, (hf, has_bias)) in parts.iter().enumerate() {
            made.push((
                format!("{hf}.weight"),
                Self::tensor(w, Some((i * rows, rows)))?,
            ));
            let bias = Self::tensor(b, Some((i * rows, rows)))?;
            if *has_bias {
                made.push((format!("{hf}.bias"), bias));
                continue;
            }
            let max = bias
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            if max != 0.0 {
                return Err(ModelError::Format {
                    path: self.bin.to_path_buf(),
                    format: "CTranslate2 model.bin",
                    reason: format!("{ct}: the k-projection bias is not zero (max |b| = {max}); HF Whisper has no k bias"),
                });
            }
        }
        self.out.extend(made);
        Ok(())
    }

    /// The parts every encoder and decoder layer has: self-attention (fused q/k/v) and FFN.
    fn block(&mut self, c: &str, h: &str) -> Result<()> {
        self.norm(
            &format!("{c}/self_attention/layer_norm"),
            &format!("{h}.self_attn_layer_norm"),
        )?;
        self.split(
            &format!("{c}/self_attention/linear_0"),
            &[
                (format!("{h}.self_attn.q_proj"), true),
                (format!("{h}.self_attn.k_proj"), false),
                (format!("{h}.self_attn.v_proj"), true),
            ],
        )?;
        self.linear(
            &format!("{c}/self_attention/linear_1"),
            &format!("{h}.self_attn.out_proj"),
        )?;
        self.norm(
            &format!("{c}/ffn/layer_norm"),
            &format!("{h}.final_layer_norm"),
        )?;
        self.linear(&format!("{c}/ffn/linear_0"), &format!("{h}.fc1"))?;
        self.linear(&format!("{c}/ffn/linear_1"), &format!("{h}.fc2"))
    }

    /// A decoder layer's cross-attention: q alone, k and v fused.
    fn cross_attention(&mut self, c: &str, h: &str) -> Result<()> {
        self.norm(
            &format!("{c}/attention/layer_norm"),
            &format!("{h}.encoder_attn_layer_norm"),
        )?;
        self.linear(
            &format!("{c}/attention/linear_0"),
            &format!("{h}.encoder_attn.q_proj"),
        )?;
        self.split(
            &format!("{c}/attention/linear_1"),
            &[
                (format!("{h}.encoder_attn.k_proj"), false),
                (format!("{h}.encoder_attn.v_proj"), true),
            ],
        )?;
        self.linear(
            &format!("{c}/attention/linear_2"),
            &format!("{h}.encoder_attn.out_proj"),
        )
    }

    /// Every tensor of the model, renamed and split into the Hugging Face layout.
    fn convert(mut self, enc_layers: usize, dec_layers: usize) -> Result<HashMap<String, Tensor>> {
        self.linear("encoder/conv1", "model.encoder.conv1")?;
        self.linear("encoder/conv2", "model.encoder.conv2")?;
        self.put(
            "model.encoder.embed_positions.weight",
            "encoder/position_encodings/encodings",
        )?;
        self.norm("encoder/layer_norm", "model.encoder.layer_norm")?;
        for i in 0..enc_layers {
            self.block(
                &format!("encoder/layer_{i}"),
                &format!("model.encoder.layers.{i}"),
            )?;
        }
        self.put(
            "model.decoder.embed_tokens.weight",
            "decoder/embeddings/weight",
        )?;
        self.put(
            "model.decoder.embed_positions.weight",
            "decoder/position_encodings/encodings",
        )?;
        self.norm("decoder/layer_norm", "model.decoder.layer_norm")?;
        for i in 0..dec_layers {
            let (c, h) = (
                format!("decoder/layer_{i}"),
                format!("model.decoder.layers.{i}"),
            );
            self.block(&c, &h)?;
            self.cross_attention(&c, &h)?;
        }
        Ok(self.out)
    }
}

/// The Hugging Face config.json of the model, read off its shapes and scalars.
fn hf_config(model: &Ct2Model, bin: &Path, summary: &ImportSummary) -> Result<serde_json::Value> {
    let dims = |name: &str| model.var(bin, name).map(|v| v.dims.clone());
    let dec_emb = model.var(bin, "decoder/embeddings/weight")?;
    Ok(serde_json::json!({
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "num_mel_bins": summary.n_mels,
        "d_model": summary.d_model,
        "encoder_layers": summary.encoder_layers,
        "encoder_attention_heads": model.scalar_int(bin, "encoder/num_heads")?,
        "encoder_ffn_dim": dims("encoder/layer_0/ffn/linear_0/weight")?[0],
        "decoder_layers": summary.decoder_layers,
        "decoder_attention_heads": model.scalar_int(bin, "decoder/num_heads")?,
        "decoder_ffn_dim": dims("decoder/layer_0/ffn/linear_0/weight")?[0],
        "vocab_size": dec_emb.dims[0],
        "max_source_positions": dims("encoder/position_encodings/encodings")?[0],
        "max_target_positions": dims("decoder/position_encodings/encodings")?[0],
        "activation_function": "gelu",
        "scale_embedding": false,
        "tie_word_embeddings": true,
        "torch_dtype": format!("{:?}", dec_emb.dtype).to_lowercase(),
        "earshot_imported_from": "ctranslate2",
    }))
}

/// Writes the model folder to `out_dir.partial` and renames it to `out_dir` at the end, so
/// an interrupted import never leaves a half-written `out_dir`.
fn write_model_folder(
    ct2_dir: &Path,
    out_dir: &Path,
    tensors: &HashMap<String, Tensor>,
    config: &serde_json::Value,
) -> Result<()> {
    let partial = PathBuf::from(format!("{}.partial", out_dir.display()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    crate::models::weights::save_safetensors_pt(tensors, &partial.join("model.safetensors"))?;
    std::fs::write(
        partial.join("config.json"),
        serde_json::to_string_pretty(config).expect("json"),
    )
    .map_err(io(&partial))?;
    for extra in [
        "tokenizer.json",
        "vocabulary.txt",
        "preprocessor_config.json",
    ] {
        let src = ct2_dir.join(extra);
        if src.is_file() {
            std::fs::copy(&src, partial.join(extra)).map_err(io(&src))?;
        }
    }
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).map_err(io(out_dir))?;
    }
    std::fs::rename(&partial, out_dir).map_err(io(out_dir))
}

/// Converts `ct2_dir` (model.bin + tokenizer.json) into `out_dir`, atomically: everything is
/// written to `out_dir.partial` and renamed at the end.
pub fn import_whisper(ct2_dir: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let bin = ct2_dir.join("model.bin");
    let model = Ct2Model::read(&bin)?;
    if model.spec != "WhisperSpec" {
        return Err(ModelError::Format {
            path: bin,
            format: "CTranslate2 model.bin",
            reason: format!("spec is {}, not WhisperSpec", model.spec),
        });
    }
    let conv1 = model.var(&bin, "encoder/conv1/weight")?;
    let mut summary = ImportSummary {
        tensors: 0,
        encoder_layers: model.count_layers("encoder"),
        decoder_layers: model.count_layers("decoder"),
        d_model: conv1.dims[0],
        n_mels: conv1.dims[1],
    };
    let config = hf_config(&model, &bin, &summary)?;
    let converter = Converter {
        model: &model,
        bin: &bin,
        out: HashMap::new(),
    };
    let tensors = converter.convert(summary.encoder_layers, summary.decoder_layers)?;
    summary.tensors = tensors.len();
    write_model_folder(ct2_dir, out_dir, &tensors, &config)?;
    Ok(summary)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub tensors: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub d_model: usize,
    pub n_mels: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with(bytes: Vec<u8>) -> Ct2Model {
        let mut vars = BTreeMap::new();
        vars.insert(
            "encoder/num_heads".to_string(),
            Ct2Var {
                dims: Vec::new(),
                dtype: DType::U8,
                bytes,
            },
        );
        Ct2Model {
            spec: "WhisperSpec".into(),
            vars,
            aliases: Vec::new(),
        }
    }

    #[test]
    fn integer_scalars_are_signed_and_a_negative_count_is_an_error() {
        let path = Path::new("model.bin");
        let read = |b: Vec<u8>| model_with(b).scalar_int(path, "encoder/num_heads");
        assert_eq!(read(vec![6]).unwrap(), 6);
        assert_eq!(read(6i16.to_le_bytes().to_vec()).unwrap(), 6);
        assert_eq!(read(20i32.to_le_bytes().to_vec()).unwrap(), 20);
        for bytes in [
            vec![0xff],
            (-2i16).to_le_bytes().to_vec(),
            (-6i32).to_le_bytes().to_vec(),
        ] {
            let err = read(bytes).unwrap_err().to_string();
            assert!(
                err.contains("encoder/num_heads") && err.contains("negative"),
                "{err}"
            );
        }
        let err = read(vec![0; 3]).unwrap_err().to_string();
        assert!(err.contains("3 bytes"), "{err}");
    }
}
