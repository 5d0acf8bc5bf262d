"""The language tasks: the autoregressive LM ('ar') and the recurrent-depth model ('recurrent') as DiffusionBlocks,
each against its end-to-end baseline.

    task.py        LMTask: the training side both share (data, the target space E and the scale contract, the
                   partition, the denoiser read-out and the loss), and the one object the commands reach
    inference.py   LMInference (a part of LMTask): sampler options, decoders, generation, teacher-forced read-outs
    evaluate.py    LMEvaluation (a part of LMTask): bits per token, the ELBO, generation scores
    sampler.py     the chain for one token: Sampler (the options), the grid, the chain's keys (plain functions)
    decode.py      compiled token decoding: a window of tokens in one jitted loop (plain functions)
    ar.py, recurrent.py   the two tasks
"""
