"""Speedup study on long outputs (plots, CSV, markdown): see dllm_spec.study.

    python scripts/speedup_study.py --quick --out runs/study-quick
"""

from dllm_spec.study import main

if __name__ == "__main__":
    main()
