"""Run by `servers.vllm` in vLLM's own interpreter (vLLM pins its own torch and transformers): imports nothing of
ailora_tools. `python vllm_worker.py REQUEST.json RESULT.json`.

REQUEST: {"prompts": [[token ids], ...], "runs": [{"model", "loras": [path | null, ...], "max_lora_rank", "dtype"}]}.
Each run is one offline engine (tokenizer skipped, eager, greedy, one new token) that serves every prompt once per
entry of `loras` (null: the model alone); the engines start one after the other in this process, so vLLM is
imported once. RESULT: {"logprobs": [run][lora][prompt] -> [log p(token i | tokens < i) for i = 1..n-1]}; a run
that fails writes {"error": "..."} instead and stops.
"""

import gc
import json
import os
import sys


def serve(run: dict, prompts: list[list[int]]) -> list[list[list[float]]]:
    """Every lora entry of `run` on `prompts`: the prompt log-probabilities of the tokens as given."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    loras = run["loras"]
    lora = any(loras)
    llm = LLM(
        model=run["model"],
        dtype=run["dtype"],
        enforce_eager=True,
        skip_tokenizer_init=True,
        seed=0,
        enable_lora=lora,
        max_lora_rank=run["max_lora_rank"] if lora else 16,
        max_loras=1,
        max_model_len=max(len(p) for p in prompts) + 1,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    served = []
    for i, path in enumerate(loras):
        request = LoRARequest(f"adapter-{i}", i + 1, path) if path else None
        # one prompt a call: vLLM 0.32's CPU LoRA kernels fail on a batch of several prompts with a LoRA (einsum
        # size mismatch)
        outs = [llm.generate([x], params, lora_request=request, use_tqdm=False)[0] for x in inputs]
        served.append(
            [[float(step[t].logprob) for step, t in zip(o.prompt_logprobs[1:], p[1:])] for o, p in zip(outs, prompts)]
        )
    del llm
    gc.collect()
    return served


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    results = []
    try:
        for run in request["runs"]:
            results.append(serve(run, request["prompts"]))
    except Exception as e:  # noqa: BLE001  (what vLLM raises is the caller's message)
        text = " ".join(f"{type(e).__name__}: {e}".split())
        with open(result_path, "w") as f:
            json.dump({"error": text[:1000], "done": len(results)}, f)
        return
    with open(result_path, "w") as f:
        json.dump({"logprobs": results}, f)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))  # on sys.path as the script's directory: its vllm.py would
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]  # shadow the real vllm
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1], sys.argv[2])
