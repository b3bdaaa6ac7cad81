"""The PEFT interop reference behind tests/peft_interop.rs (issue #26), run once; its small
outputs are committed under tests/fixtures/peft/, so the test suite needs no torch.

Pinned: torch==2.5.1 transformers==4.46.3 peft==0.13.2 (PyPI, CPU inference in float32).

    earshot import gguf ~/.cache/earshot/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2-hf
    python scripts/peft_reference.py /tmp/smollm2-hf tests/fixtures/peft/earshot_adapter tests/fixtures/peft

MODEL_DIR: SmolLM2-135M-Instruct in Hugging Face's layout (earshot's export of the default
GGUF: the same weights earshot runs, dequantized to float32). EARSHOT_ADAPTER: a LoRA folder
earshot wrote (a run's adapter/). Writes into OUT:
  ids.npy                     the input token ids (float32, exact below 2^24)
  positions.npy               the positions whose logits are kept
  logits_base.npy             (positions, vocab) logits without an adapter
  peft_adapter/               an adapter made by peft (rank 8, alpha 16, rsLoRA, q/k/o/up
                              projections of layers 1 and 28, B drawn at random: PEFT's own
                              init leaves B at zero, which would test nothing)
  logits_peft_adapter.npy     the logits with it, in transformers + peft
  logits_earshot_adapter.npy  the logits with EARSHOT_ADAPTER loaded by peft
"""

import sys
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer

PINNED = {"torch": "2.5.1", "transformers": "4.46.3", "peft": "0.13.2"}
TEXT = (
    "<|im_start|>user\nWhich instrument family plays this note, and in which register?"
    "<|im_end|>\n<|im_start|>assistant\nA piano note in the"
)


def main() -> None:
    for module, want in [(torch, PINNED["torch"]), (transformers, PINNED["transformers"]), (peft, PINNED["peft"])]:
        have = module.__version__.split("+")[0]
        if have != want:
            sys.exit(f"{module.__name__} {have} is installed; the reference is pinned to {want}")
    model_dir, earshot_adapter, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT).ids
    positions = [len(ids) // 2, len(ids) - 1]
    np.save(out / "ids.npy", np.array(ids, dtype=np.float32))
    np.save(out / "positions.npy", np.array(positions, dtype=np.float32))
    batch = torch.tensor([ids])

    def load_base():
        m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        return m.eval()

    def logits(model) -> np.ndarray:
        with torch.no_grad():
            return model(batch).logits[0, positions].float().numpy()

    np.save(out / "logits_base.npy", logits(load_base()))

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        layers_to_transform=[1, 28],
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    made = get_peft_model(load_base(), config)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    made.eval()
    np.save(out / "logits_peft_adapter.npy", logits(made))
    made.save_pretrained(out / "peft_adapter")

    theirs = PeftModel.from_pretrained(load_base(), earshot_adapter).eval()
    np.save(out / "logits_earshot_adapter.npy", logits(theirs))
    print(f"wrote {out}: {len(ids)} ids, logits at positions {positions}")


if __name__ == "__main__":
    main()
