"""Plot held-out tau against training tokens: python scripts/plot_training_curves.py LABEL=RUN_DIR ... --out curve.png"""

from dllm_spec.training.curves import main

if __name__ == "__main__":
    main()
