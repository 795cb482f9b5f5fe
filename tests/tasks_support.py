"""The tasks/ fixture as the tests read it: its cases as requests of `mimo_jax.tasks.requests`."""

import json

import numpy as np

from mimo_jax.tasks.text_tokenizer import TextTokenizer

# Official builder -> our task; the builders' argument names that a request spells differently.
TASK_OF_BUILDER = {
    "get_asr_sft_prompt": "asr",
    "get_tts_sft_prompt": "tts",
    "get_audio_understanding_sft_prompt": "understand",
    "get_spoken_dialogue_sft_prompt": "dialogue",
    "get_spoken_dialogue_sft_multiturn_prompt": "dialogue",
    "get_s2t_dialogue_sft_prompt": "s2t_dialogue",
    "get_s2t_dialogue_sft_multiturn_prompt": "s2t_dialogue",
    "get_text_dialogue_sft_prompt": "text_dialogue",
    "get_text_dialogue_sft_multiturn_prompt": "text_dialogue",
    "get_in_context_learning_s2s_prompt": "few_shot",
}
RENAMED = {"input_speech": "input", "audio": "input"}


class TasksFixture:
    def __init__(self, root):
        self.dir = root / "tasks"
        self.meta = json.loads((self.dir / "cases.json").read_text())
        self.ref = dict(np.load(self.dir / "reference.npz"))
        self.tok = TextTokenizer.from_file(str(self.dir / self.meta["text_tokenizer"]))
        self.lm_dir = self.dir / self.meta["lm"]  # an official-format checkpoint directory
        self.cases = {c["name"]: c for c in self.meta["cases"]}
        self.group_size = self.meta["group_size"]
        self.channels = self.meta["audio_channels"]
        self.empty_ids = self.meta["speech_empty_ids"]
        self.wavs = {
            name: self.ref[w["array"]] for name, w in self.meta["wavs"].items() if "array" in w
        }

    def audio(self, value):
        """A fixture audio argument -> what a request holds (an array, or a file path)."""
        if "wav" in value:
            return self.wavs[value["wav"]]
        return str(self.dir / value["file"])

    def source(self, audio) -> str:
        """The `source` name of `audio_inputs` for an audio value of a request."""
        if isinstance(audio, str):
            return audio.rsplit("/", 1)[-1]
        return next(n for n, w in self.wavs.items() if w is audio)

    def _value(self, value):
        if isinstance(value, dict) and set(value) <= {"wav", "file"}:
            return self.audio(value)
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(v) for v in value]
        return value

    def request(self, case: dict) -> tuple[dict, bool]:
        """(request, history) for a case."""
        task = TASK_OF_BUILDER[case["builder"]]
        args = dict(case["args"])
        history = bool(args.pop("add_history", False))
        if task == "text_dialogue" and "input_text" in args:
            args["input"] = args.pop("input_text")
        req = {"task": task, **{RENAMED.get(k, k): self._value(v) for k, v in args.items()}}
        if "template" in case:
            req["template"] = case["template"]["value"]
        return req, history

    def reference_patches(self, case: dict, audio) -> np.ndarray:
        """`CASE__audio_codes_K` of the case's input with the source of `audio`, as patches."""
        k = next(a["k"] for a in case["audio_inputs"] if a["source"] == self.source(audio))
        codes = self.ref[f"{case['name']}__audio_codes_{k}"]
        return codes.reshape(-1, self.group_size, self.channels)


# The official wrapper's task_name of a generation -> our task.
TASK_OF_GENERATION = {
    "tts": "tts",
    "asr": "asr",
    "in_context_learning_s2s": "few_shot",
    "audio_understanding": "understand",
    "spoken_dialogue": "dialogue",
    "text_chat": "text_dialogue",
}


def generated_groups(fx: TasksFixture, gen: dict):
    """(text [S], codes [S, group_size, channels]) of a generation's generated groups."""
    ids = fx.ref[f"{gen['case']}__generated_ids"]
    p, g = gen["prompt_groups"], fx.group_size
    text = ids[0, p * g :: g]
    codes = ids[1:, p * g :].T.reshape(-1, g, fx.channels)
    return text, codes


def fixture_lm(fx: TasksFixture):
    """(config, model) of the tasks/ LM, loaded as its config.json says."""
    from mimo_jax.conversion.convert import load_torch_checkpoint
    from mimo_jax.lm.conversion import LMFamily

    return load_torch_checkpoint(fx.lm_dir, LMFamily())


def record_batches(monkeypatch, record):
    """Patches MimoAudio's batch generation: `record(requests)` of each batch goes into the list
    returned first, and `fail[id] = exception` (the dict returned second) makes the batch holding
    that request raise it inside its generation."""
    from mimo_jax.inference.mimo_audio import MimoAudio

    ran, fail, real = [], {}, MimoAudio._generate

    def generate_batch(self, jobs, results):
        requests = [j.request for j in jobs]
        ran.append(record(requests))
        for r in requests:
            if r["id"] in fail:
                raise fail[r["id"]]
        return real(self, jobs, results)

    monkeypatch.setattr(MimoAudio, "_generate", generate_batch)
    return ran, fail
