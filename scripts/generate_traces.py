"""Generate reasoning traces (resumable, multi-process): see dllm_spec.traces.

    python scripts/generate_traces.py prompts.jsonl --out traces.jsonl
    accelerate launch --num_processes 2 -m dllm_spec.traces prompts.jsonl --out traces.jsonl
"""

from dllm_spec.traces import main

if __name__ == "__main__":
    main()
