"""The toy alignment experiment of examples/toy_alignment.py, one concern per module:

    experiment.py   what is run: methods, mode presets, command-line flags
    family.py       the model family (--family sd | flow): what differs between the UNet and the flow base
    world.py        the synthetic world and its true preference, measured from pixels
    base.py         the tiny base text-to-image model (StableDiffusionPipeline, or StableDiffusion3Pipeline)
    data.py         the preference pairs (world or on-policy), the reward model, their scores
    runs.py         caching, subprocesses, training runs and the evaluation of checkpoints
    stats.py        summaries of samples, curves over seeds, comparisons with Diffusion-DPO
    report.py       results.json, results.md, the plot, the sample grid, the terminal table
    pipeline.py     the stages in order, with their timings (flow: the inversion probe that picks K and R)
"""
