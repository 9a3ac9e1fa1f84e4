"""Long-tail image classification with foundation models on the Hugging Face stack.

Layers, bottom to top. A module imports from its own group or from a lower level, never from a higher level or from
another group of its level; imports inside functions count too. tests/test_layers.py reads this table.

    0 base     __init__ errors registry paths fileio axes hub_access
    1 helpers  batchnorm compile schedule samplers transforms prompts losses metrics lt_metric reports merge protocols
    2 data     data data.*
    2 models   methods heads peft_modules cifar_resnet text_towers modeling_lt models peft_methods head_init zeroshot
    3 saving   checkpoint hub_files hub exports runs paper_tables
    4 config   config spec
    5 run      data_loaders engine training run_loop eval_runs inference
    6 soup     soup
    7 scripts  train_lt.py soup.py eval_lt.py predict.py data_scripts/build_lt.py scripts/convert_export.py
    7 scripts  scripts/reproduce.py

helpers know neither data nor models; data and models do not know each other; saving writes and reads checkpoints
and exports of models; config checks flags against every registry below it and spec types them into one run spec; run trains and evaluates; soup averages
runs (merge: how one tensor's values combine, pure math); the scripts (outside this package) are the command lines.
"""

__version__ = "0.1.0"
