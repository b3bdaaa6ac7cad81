use std::io::Write;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::cli::exit::Exit;
use crate::models::Runtime;
use crate::selftest::{run as run_selftest, SelftestError, SelftestReport, Shape};
use crate::text::terminal_safe_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The CPU (f32 unless --dtype says otherwise)
    Cpu,
    /// CUDA device 0, bf16 unless --dtype says otherwise (needs a build with --features cuda)
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeChoice {
    F32,
    Bf16,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Builds the encoder, the LLM and the projector at a named shape with seeded \
random weights (nothing is downloaded) and checks them on the device: encoder and LLM forward \
against the CPU in f32 on the same weights (relative L2; 1e-4 in f32, 5e-2 in bf16, whose \
8-bit mantissa rounds each op by up to 0.2%), the projector gradient against a central finite \
difference (f64, CPU, a 1-layer LLM of the shape's widths; 1e-4), 10 AdamW steps (lr 1e-2) on one fixed \
batch (the loss must fall below 0.9x its first value), greedy decoding with the KV cache \
against recomputing the sequence (no token may differ). Prints each check, the training step \
time, decode tokens/s, peak host memory and, on CUDA, the device memory of a training step \
(the pool's high-water mark: weights, activations, gradients, optimizer state); exit 1 if a \
check fails.\n\n`seed` (Whisper large-v3 \
encoder + a Mistral-7B-shaped LLM) needs ~60 GB of host memory (f32 weights and the CPU \
reference): run it on a GPU machine, or here with --llm-layers 2 (~8 GB).\n\n\
Example:\n  earshot selftest --shape tiny"
)]
pub struct SelftestArgs {
    /// Model shapes to build
    #[arg(long, value_enum, default_value_t = Shape::Tiny)]
    pub shape: Shape,
    /// Where to run the checks
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Precision of the models on the device (default: f32 on the CPU, bf16 on CUDA).
    /// `--dtype bf16` on the CPU runs the composed (unfused) ops a GPU runs, in bf16, against
    /// the CPU f32 reference: the GPU's code path checked without a GPU, slowly
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeChoice>,
    /// Cut the LLM to its first N layers (widths, heads, vocabulary and head stay the
    /// shape's): the seed shape's structure on a machine without the memory for 7B
    #[arg(long, value_name = "N")]
    pub llm_layers: Option<usize>,
    /// Seed of the random weights and inputs
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The report as one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let rt = match args.device {
        DeviceChoice::Cpu => Runtime::cpu(),
        DeviceChoice::Cuda => {
            let rt = Runtime::best_available();
            if rt.device.is_cpu() {
                bail!(
                    "--device cuda: no CUDA device (this binary was built {} the cuda feature)",
                    if cfg!(feature = "cuda") {
                        "with"
                    } else {
                        "without"
                    }
                );
            }
            rt
        }
    };
    let dtype = match args.dtype {
        None => rt.dtype,
        Some(DTypeChoice::F32) => DType::F32,
        Some(DTypeChoice::Bf16) => DType::BF16,
    };
    let report = run_selftest(args.shape, &rt.device, dtype, args.seed, args.llm_layers).map_err(
        |e| match e {
            SelftestError::Usage(message) => Exit::usage(message),
            e => e.into(),
        },
    )?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            terminal_safe_json(serde_json::to_string(&report)?)
        )?;
    } else {
        write_table(&mut out, &report)?;
    }
    if !report.passed() {
        bail!("selftest failed: see the checks marked FAIL");
    }
    Ok(())
}

fn write_table(out: &mut impl Write, r: &SelftestReport) -> Result<()> {
    writeln!(
        out,
        "selftest {:?} ({} LLM layers) on {} ({})",
        r.shape, r.llm_layers, r.device, r.dtype
    )?;
    for c in &r.checks {
        writeln!(
            out,
            "  {:4}  {:<58} {:>10.3e}  (limit {:.0e})  {}",
            if c.passed { "ok" } else { "FAIL" },
            c.name,
            c.value,
            c.limit,
            c.detail
        )?;
    }
    writeln!(out, "  training step      {:.3} s", r.train_step_s)?;
    writeln!(
        out,
        "  with LoRA          {:.3} s (rank 8, q_proj, v_proj)",
        r.lora_train_step_s
    )?;
    writeln!(
        out,
        "  decode             {:.1} tokens/s",
        r.decode_tokens_per_s
    )?;
    if let Some(m) = &r.device_memory {
        writeln!(
            out,
            "  device memory      {:.0} MiB resident before training, {:.0} MiB peak in a \
             training step, {:.0} MiB in use on the device after",
            m.resident_mib, m.train_step_peak_mib, m.device_used_mib
        )?;
    }
    match r.peak_rss_mib {
        Some(m) => writeln!(out, "  peak memory (RSS)  {m:.0} MiB")?,
        None => writeln!(out, "  peak memory (RSS)  unknown")?,
    }
    Ok(())
}
