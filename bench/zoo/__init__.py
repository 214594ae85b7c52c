"""The recipes that train msdda's embedded zoo (the weights live in the runtime package, ``msdda.zoo``).

    common.py     logging, seeded generators, atomic JSON records, durations, model cards
    data.py       scikit-learn's digits at 16x16, the split, the classifier's augmentation
    diffusion.py  the UNet and scheduler configs, the Improved-DDPM hybrid loss, diffusers' reference sampler
    ckpt.py       resumable safetensors checkpoints
    train.py      the classifier and base stages, and the command line (bench/train_zoo.py)
    rl.py         the experts and MORL oracles: KL-regularised step-level RL
    step.py       the "step" flavour's experts: the step-level optimum distilled by importance sampling
    readme.py     models/README.md

Imports run one way: train -> step -> rl -> diffusion, data, ckpt, common.
"""
