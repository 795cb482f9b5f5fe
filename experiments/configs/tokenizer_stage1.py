"""Stage 1 of audio tokenizer training (report §2.1.2): encoder, RVQ, decoder and vocoder from
scratch on 10 x the A2T loss, the multi-scale mel loss and the commitment loss, the codebooks by
k-means then EMA.

    python -m experiments.train --config experiments/configs/tokenizer_stage1.py --workdir runs/t1 \
        --config.data.manifests=corpus.jsonl --config.data.tokenizer=tokenizer.json
    python -m experiments.train --config experiments/configs/tokenizer_stage1.py:demo \
        --workdir runs/tokenizer1

Arguments: `demo` (the demo's tokenizer size on its eSpeak NG corpus), `data` (its directory,
default runs/demo/data, which `python -m experiments.demo` makes).
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, demo=False, data="runs/demo/data")
    return common.tokenizer_config("stage1", a.demo, a.data)
