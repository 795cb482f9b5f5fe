"""Stage 2 of audio tokenizer training (report §2.1.2): the encoder and quantizer of a stage-1
tokenizer frozen, the decoder and vocoder trained against the multi-period and multi-scale STFT
discriminators (mel reconstruction 1, hinge adversarial 1, feature matching 2).

    python -m experiments.train --config experiments/configs/tokenizer_stage2.py --workdir runs/t2 \
        --config.model.init_checkpoint=runs/t1/model --config.data.manifests=corpus.jsonl
    python -m experiments.train --config experiments/configs/tokenizer_stage2.py:demo \
        --workdir runs/tokenizer2 --config.model.init_checkpoint=runs/tokenizer1/model

Arguments: `demo` (the demo's tokenizer size on its eSpeak NG corpus), `data` (its directory).
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, demo=False, data="runs/demo/data")
    return common.tokenizer_config("stage2", a.demo, a.data)
