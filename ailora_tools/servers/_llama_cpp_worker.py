"""Run by llama.cpp's interpreter (not imported): the logits llama.cpp gives each prompt, float32, every position.

Usage: python _llama_cpp_worker.py JOB.json OUT.npz, JOB = {"base", "lora", "lora_scale", "prompts", "n_ctx"}.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0

job = json.loads(open(sys.argv[1]).read())
llm = Llama(model_path=job["base"], lora_path=job["lora"], lora_scale=job["lora_scale"], logits_all=True,
            n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_ubatch=job["n_ctx"], type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32, flash_attn=False, n_threads=2, n_threads_batch=2, verbose=False)
out = {}
for i, prompt in enumerate(job["prompts"]):
    llm.reset()
    llm.eval(prompt)
    out[f"p{i}"] = np.array(llm.scores[: len(prompt)], dtype=np.float32)
np.savez(sys.argv[2], **out)
