"""Run the pinned llama.cpp's own convert_hf_to_gguf.py (from third_party) on a
test checkpoint: the independent converter the tests compare against.

Usage: python tests/llama_cpp_convert.py MODEL_DIR OUT.gguf [--outtype f32]

The converter identifies a BPE pre-tokenizer by hashing how the tokenizer
splits a test string and refuses tokenizers it does not know. The tests
train their own tiny byte-level BPE, whose hash no release knows, so this
wrapper tells the converter to call it `gpt-2` (the byte-level pre-tokenizer
those tokenizers use). Nothing else is changed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LLAMA_CPP = Path(__file__).resolve().parent.parent / "third_party" / "llama.cpp"


def main() -> None:
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{LLAMA_CPP} is missing; run python tools/fetch_llama_cpp.py")
    # the converter is a script with a sibling package, not an installed module
    sys.path.insert(0, str(LLAMA_CPP))
    os.environ.pop("NO_LOCAL_GGUF", None)  # let it use its own gguf-py, matching its code
    import convert_hf_to_gguf
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    model_dir, out, *rest = sys.argv[1:]
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
