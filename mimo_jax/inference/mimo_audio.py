"""Every MiMo-Audio task from requests to text and speech: `MimoAudio`.

    mimo = MimoAudio.load("MiMo-Audio-7B-Instruct", "MiMo-Audio-Tokenizer",
                          "MiMo-Audio-7B-Instruct/tokenizer.json")
    [r] = mimo.tts([{"input": "Good morning!"}])        # r.text, r.wav (24 kHz float32)
    texts = [r.text for r in mimo.asr(["a.wav", "b.flac"])]

A task method takes a list of requests (`mimo_jax.tasks.requests`; a bare value is the `input`)
and runs them as batched, KV-cached generations: requests that share their seed form left-padded
batches whatever their tasks (prompts of different lengths, each row with its own stop tokens,
samplers and lengths, stopping on its own). Samplers default to the official per-task presets
(`task_sampler_configs`), overridable per instance or per call; `greedy` makes both greedy.
Multi-turn spoken dialogue follows the official history: pass the previous `Result` as `history`
and the next user turn is appended to its whole sequence (prompt and generation). `run_iter`
hands out each batch's results as soon as the batch is done.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.inference.generation_loop import GenerationConfig, generate, generate_chunks
from mimo_jax.inference.sampling import GREEDY, SamplerConfig
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.layout import empty_patch
from mimo_jax.lm.model import MiMoAudioLM, unstack_for_decoding
from mimo_jax.tasks import outputs, requests, segments
from mimo_jax.tasks.audio import AudioFrontEnd
from mimo_jax.tasks.requests import MAX_GROUPS, RequestError
from mimo_jax.tasks.text_tokenizer import TextTokenizer, model_id_problems
from mimo_jax.tokenizer.audio_io import InputError
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer
from mimo_jax.tokenizer.streaming import StreamingDecoder

# Fewer compilations: prompt batches are left-padded to a multiple of WIDTH_QUANTUM groups, and
# their KV caches hold a multiple of LENGTH_QUANTUM groups (within the context).
WIDTH_QUANTUM = 32
LENGTH_QUANTUM = 32
_LOCAL = SamplerConfig(do_sample=True, temperature=0.9, top_p=0.95)
# The official `task_sampler_configs`: (text sampler, patch sampler) per task name; others use
# "default".
TASK_SAMPLERS = {
    "asr": (SamplerConfig(False, 1.0, None, 1.0), _LOCAL),
    "tts": (SamplerConfig(True, 0.6, None, 1.0), _LOCAL),
    "spoken_dialogue": (SamplerConfig(True, 0.6, None, 0.95), _LOCAL),
    "audio_understanding": (SamplerConfig(True, 0.3, None, 0.95), _LOCAL),
    "text_chat": (SamplerConfig(True, 0.4, None, 0.95), _LOCAL),
    "in_context_learning_s2s": (SamplerConfig(False, 1.0, None, 1.0), _LOCAL),
    "default": (SamplerConfig(True, 0.6, 50, 0.95), SamplerConfig(True, 0.9, 50, 0.95)),
}


@dataclasses.dataclass
class Result:
    request: dict
    text: str = ""  # as the official `forward` returns it
    wav: np.ndarray | None = None  # 24 kHz float32, speech tasks only
    speech: np.ndarray | None = None  # the decoded frames [F, channels]
    sequence: segments.Prompt | None = None  # prompt and generated groups (the history)
    prompt_groups: int = 0
    error: str | None = None

    @property
    def generated_groups(self) -> int:
        return self.sequence.groups - self.prompt_groups if self.sequence else 0


@dataclasses.dataclass
class AudioChunk:
    """What `MimoAudio.stream` hands out: audio of one request, as soon as it is ready."""

    index: int  # the request's position in the call
    wav: np.ndarray  # 24 kHz float32 samples following the request's earlier chunks
    result: Result | None = None  # on the request's last chunk only


@dataclasses.dataclass
class _Job:
    index: int
    request: dict
    spec: requests.TaskSpec
    prompt: segments.Prompt
    seed: int
    samplers: tuple[SamplerConfig, SamplerConfig]  # text, patch


def load_lm(path: str | Path, dtype=None, adapter: str | Path | None = None):
    """(config, model) from an official directory (converted in memory) or a converted one; with
    `adapter` (a PEFT LoRA directory, `lm.adapters`), its adapters merged into the weights."""
    from mimo_jax.conversion import param_store
    from mimo_jax.conversion.convert import load_torch_checkpoint
    from mimo_jax.lm.conversion import LMFamily

    path = Path(path)
    if param_store.is_model_checkpoint(path):
        config, model = param_store.load(path, LMFamily(), dtype=dtype)
    elif not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not an LM checkpoint (expected config.json with "
            f"model*.safetensors, or a converted checkpoint with params/)"
        )
    else:
        config, model = load_torch_checkpoint(path, LMFamily(), dtype)
    if adapter is None:
        return config, model
    from mimo_jax.lm import adapters
    from mimo_jax.lm.lora import merge_lora, module_at

    layers = adapters.load(model, adapter)
    model = merge_lora(model)
    # An adapter that is valid but huge (its lora_alpha, its weights) overflows the merge.
    broken = [
        layer.shown()
        for layer in layers
        if not jnp.isfinite(module_at(model, layer.path).kernel[...]).all()
    ]
    if broken:
        raise ValueError(
            f"{adapter}: merging the adapter gives weights that are not finite in "
            f"{', '.join(broken)} (check its lora_alpha and weights)"
        )
    return config, model


def context_limit(config: MiMoAudioConfig, groups: int | None) -> int:
    """The context (prompt and generation, in groups) of `groups` requested: by default the
    official MAX_GROUPS, or the LM's positions where they end sooner."""
    limit = config.max_positions
    if groups is None:
        return MAX_GROUPS if limit is None else min(MAX_GROUPS, limit)
    if limit is not None and not 1 <= groups <= limit:
        raise ValueError(
            f"context_groups {groups}: expected 1 to {limit} (the LM's max_position_embeddings)"
        )
    if groups < 1:
        raise ValueError(f"context_groups {groups}: expected at least 1")
    return groups


def check_special_ids(
    config: MiMoAudioConfig, tok: TextTokenizer, source: str = "the LM checkpoint"
) -> None:
    """The LM's special ids must be the text tokenizer's; every disagreement is named."""
    problems = model_id_problems(config, tok)
    if problems:
        raise ValueError(f"{source} does not match the text tokenizer: " + "; ".join(problems))


class MimoAudio:
    """The LM, the audio tokenizer and the text tokenizer, with a method per task."""

    def __init__(
        self,
        config: MiMoAudioConfig,
        model: MiMoAudioLM,
        audio_tokenizer: Tokenizer,
        text_tokenizer: TextTokenizer,
        *,
        context_groups: int | None = None,
    ):
        check_special_ids(config, text_tokenizer)
        # Prompt and generation together, in groups.
        self.context_groups = context_limit(config, context_groups)
        self.config, self.model = config, model
        self.tok = text_tokenizer
        self.audio = AudioFrontEnd(audio_tokenizer, config.group_size, config.audio_channels)
        self.task_sampler_configs = dict(TASK_SAMPLERS)

    @classmethod
    def load(
        cls,
        lm: str | Path,
        audio_tokenizer: str | Path,
        text_tokenizer: str | Path,
        *,
        dtype=None,
        adapter: str | Path | None = None,
        **options,
    ) -> "MimoAudio":
        """From checkpoint directories (official or converted), a tokenizer.json (or the
        directory holding it) and optionally a LoRA adapter directory for the LM."""
        from mimo_jax.tokenizer.audio_tokenizer import Tokenizer

        config, model = load_lm(lm, dtype, adapter)
        if jax.default_backend() == "cpu":  # a CPU cost; elsewhere not worth a stack's copy
            model = unstack_for_decoding(model)
        return cls(
            config,
            model,
            Tokenizer.load(str(audio_tokenizer)),
            TextTokenizer.from_file(str(text_tokenizer)),
            **options,
        )

    # ---- one method per task -------------------------------------------------------------------
    def asr(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="asr", **kw)

    def tts(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="tts", **kw)

    def understand(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="understand", **kw)

    def dialogue(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="dialogue", **kw)

    def s2t_dialogue(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="s2t_dialogue", **kw)

    def text_dialogue(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="text_dialogue", **kw)

    def few_shot(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="few_shot", **kw)

    def continue_speech(self, reqs, **kw) -> list[Result]:
        return self.run(reqs, task="continue", **kw)

    # ---- the engine ----------------------------------------------------------------------------
    def run(self, reqs, *, progress=None, **options) -> list[Result]:
        """Results in the order of `reqs` (the options are `run_iter`'s); `progress(n)` is
        called as n more requests are done."""
        results: list[Result | None] = [None] * len(reqs)
        for i, res in self.run_iter(reqs, **options):
            results[i] = res
            if progress is not None:
                progress(1)
        return results  # type: ignore[return-value]  # every index is handed out once

    def run_iter(
        self,
        reqs,
        *,
        task: str | None = None,
        history=None,
        text_sampler: SamplerConfig | None = None,
        patch_sampler: SamplerConfig | None = None,
        batch_size: int | None = None,
        raise_errors: bool = True,
    ) -> Iterator[tuple[int, Result]]:
        """(index in `reqs`, Result) of every request as soon as it is done: bad requests first,
        then each batch's results when the batch ends (speech decoded). `history`: one previous
        Result (or None) per request. Every request is checked before any generation. Requests
        are sorted by prompt length into batches of `batch_size` (default: one batch per seed).
        With `raise_errors=False` a bad request gets its `error`, an exception inside a batch
        becomes the error of that batch's requests, and the others still run."""
        results, batches = self._plan(
            reqs, task, history, text_sampler, patch_sampler, batch_size, raise_errors
        )
        for i, r in enumerate(results):
            if r.error is not None:
                yield i, r
        for jobs in batches:
            try:
                self._generate(jobs, results)
                self._decode([(results[j.index], results[j.index].speech) for j in jobs])
            except Exception as e:  # any failure stays inside its batch
                if raise_errors:
                    raise
                for j in jobs:
                    results[j.index] = _failed(j, e)
            for j in jobs:
                yield j.index, results[j.index]

    def stream(
        self,
        reqs,
        *,
        task: str | None = None,
        history=None,
        text_sampler: SamplerConfig | None = None,
        patch_sampler: SamplerConfig | None = None,
        batch_size: int | None = None,
        raise_errors: bool = True,
        chunk_groups: int = 8,
        left_context: int = 250,
        right_context: int = 40,
    ) -> Iterator[AudioChunk]:
        """`run`, with the speech handed out while it is generated.

        Generation stops every `chunk_groups` groups; the new speech frames of each request (the
        frames `run` would decode, between `<|sostm|>` and `<|eostm|>` where the task has them)
        go through a `StreamingDecoder` (its `left_context` and `right_context`, in code frames)
        and the audio that is ready comes out as an `AudioChunk` per request. A request's last
        chunk carries its `Result`, whose `wav` is the joined stream (1 s of zeros when there is
        no speech, as in `run`); a bad request (with `raise_errors=False`) gets one empty chunk
        with its Result first. The generated ids equal those of `run`.
        """
        if chunk_groups < 1:
            raise ValueError(f"chunk_groups {chunk_groups}: expected at least 1")
        results, batches = self._plan(
            reqs, task, history, text_sampler, patch_sampler, batch_size, raise_errors
        )
        nothing = np.zeros(0, np.float32)
        for i, r in enumerate(results):
            if r.error is not None:
                yield AudioChunk(i, nothing, r)
        for jobs in batches:
            decoder = StreamingDecoder(
                self.audio.tokenizer,
                len(jobs),
                left_context=left_context,
                right_context=right_context,
            )
            finished = set()
            try:
                for piece in self._stream_batch(jobs, results, chunk_groups, decoder):
                    if piece.result is not None:
                        finished.add(piece.index)
                    yield piece
            except Exception as e:  # any failure stays inside its batch
                if raise_errors:
                    raise
                for j in jobs:
                    if j.index not in finished:
                        results[j.index] = _failed(j, e)
                        yield AudioChunk(j.index, nothing, results[j.index])

    def _plan(
        self, reqs, task, history, text_sampler, patch_sampler, batch_size, raise_errors
    ) -> tuple[list[Result], list[list[_Job]]]:
        """Results (errors filled in) and the batches to generate."""
        reqs = [r if isinstance(r, dict) else {"input": r} for r in reqs]
        if task is not None:
            reqs = [{**r, "task": task} for r in reqs]
        history = history or [None] * len(reqs)
        results = [Result(dict(r)) for r in reqs]
        parsed = []  # (index, request, spec, segments, history) of the well-formed requests
        for i, (r, h) in enumerate(zip(reqs, history)):
            try:
                parsed.append(
                    (i, r, requests.task_of(r), requests.segments(r, history=h is not None), h)
                )
            except (RequestError, InputError, ValueError, KeyError, TypeError) as e:
                self._fail(results[i], e, raise_errors)
        jobs = self._encode(
            parsed, results, raise_errors, random.randrange(2**31), (text_sampler, patch_sampler)
        )
        # Rows of a batch share its random key, hence its seed; everything else is per row.
        groups: dict[int, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.seed, []).append(job)
        batches = []
        for members in groups.values():
            members.sort(key=lambda j: j.prompt.groups)
            step = batch_size or len(members)
            batches += [members[s : s + step] for s in range(0, len(members), step)]
        return results, batches

    def _fail(self, result: Result, error: Exception, raise_errors: bool):
        if raise_errors:
            raise error
        result.error = str(error)

    def _encode(self, jobs, results, raise_errors, call_seed: int, samplers) -> list[_Job]:
        """Reads and checks every audio input, encodes all of them in one batch, assembles.
        Requests without a seed share `call_seed`, so that they can share a batch. `samplers`:
        the call's (text, patch) samplers, None for the presets."""
        ready: list[tuple] = []
        wavs: list[np.ndarray] = []
        for i, r, spec, segs, hist in jobs:
            try:
                audio = segments.audio_inputs(segs)
                mine = [
                    self.audio.waveform(a, f"request {r.get('id', i)}: audio {k}")
                    for k, a in enumerate(audio)
                ]
            except InputError as e:
                self._fail(results[i], e, raise_errors)
                continue
            try:
                self._check_length(r, self._groups_before_encoding(segs, mine, hist))
            except RequestError as e:
                self._fail(results[i], e, raise_errors)
                continue
            ready.append((i, r, spec, segs, hist, len(wavs), len(mine)))
            wavs += mine
        codes = self.audio.codes(wavs)
        out = []
        for i, r, spec, segs, hist, start, n in ready:
            patches = [
                segments.patchify(c, self.config.group_size, self.config.audio_channels)
                for c in codes[start : start + n]
            ]
            prompt = segments.assemble(
                segments.with_audio(segs, patches),
                self.tok,
                self.config.group_size,
                self.config.speech_empty_ids,
            )
            if hist is not None:
                prompt = hist.sequence + prompt
            seed = r.get("seed")
            seed = call_seed if seed is None else int(seed)
            out.append(_Job(i, r, spec, prompt, seed, self._samplers(r, spec, *samplers)))
        return out

    def _groups_before_encoding(self, segs, wavs, hist) -> int:
        """The prompt's length in groups, its audio counted from the waveforms' lengths (so that
        an over-long prompt is refused before its audio is encoded)."""
        c, tc = self.config, self.audio.tokenizer.config
        frames = [tc.code_frames(tc.mel_frames(w.size)) for w in wavs]
        audio_groups = sum(-(-f // c.group_size) + 2 for f in frames)
        text_groups = sum(
            len(self.tok.encode(s.text)) for s in segs if isinstance(s, segments.Text)
        )
        return text_groups + audio_groups + (hist.sequence.groups if hist else 0)

    def _check_length(self, request, groups: int):
        room = self.context_groups - groups
        need = max(1, request.get("min_new_groups") or 0)
        if room < need:
            raise RequestError(
                f"request {request.get('id', '')}: the prompt has about {groups} "
                f"groups (voice prompt and inputs included), which leaves no room "
                f"for {need} new groups in the context of {self.context_groups}"
            )

    def _samplers(self, request: dict, spec: requests.TaskSpec, text_sampler, patch_sampler):
        if request.get("greedy"):
            return GREEDY, GREEDY
        preset = self.task_sampler_configs.get(spec.sampler, self.task_sampler_configs["default"])
        return text_sampler or preset[0], patch_sampler or preset[1]

    def _generation_config(self, job: _Job, width: int) -> GenerationConfig:
        """A request's generation settings in a batch whose prompts are `width` groups wide."""
        r = job.request
        stops = (self.tok.eos_id,) + tuple(self.tok.special_id(t) for t in job.spec.stop_tokens)
        max_new, limit = r.get("max_new_groups"), self.context_groups
        return GenerationConfig(
            max_length=limit if max_new is None else min(limit, width + int(max_new)),
            min_length=width + int(r.get("min_new_groups") or 0),
            stop_ids=stops,
            text_sampler=job.samplers[0],
            patch_sampler=job.samplers[1],
        )

    def _batch(self, jobs: list[_Job]):
        """The left-padded prompt batch of `jobs`: (width, generate's arguments)."""
        longest = max(j.prompt.groups for j in jobs)
        width = -(-longest // WIDTH_QUANTUM) * WIDTH_QUANTUM
        if any(
            width + int(j.request.get("max_new_groups") or 1) > self.context_groups for j in jobs
        ):
            width = longest  # padding must not take the room of the generation
        c = self.config
        text = np.full((len(jobs), width), self.tok.pad_id, np.int32)
        codes = np.broadcast_to(
            empty_patch(c.speech_empty_ids, c.group_size),
            (len(jobs), width, c.group_size, c.audio_channels),
        ).copy()
        for row, j in enumerate(jobs):
            text[row, width - j.prompt.groups :] = j.prompt.text
            codes[row, width - j.prompt.groups :] = j.prompt.codes
        gens = [self._generation_config(j, width) for j in jobs]
        longest = max(g.max_length for g in gens)
        cache = min(self.context_groups, -(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM)
        return (
            width,
            (self.model, text, codes, gens),
            dict(
                prompt_lengths=[j.prompt.groups for j in jobs],
                rng=jax.random.key(jobs[0].seed),
                cache_groups=cache,
            ),
        )

    def _generate(self, jobs: list[_Job], results: list[Result]):
        width, args, kw = self._batch(jobs)
        gen = generate(*args, **kw)
        for row, j in enumerate(jobs):
            end = int(gen.lengths[row])
            self._finish(j, gen.text[row, width:end], gen.codes[row, width:end], results[j.index])

    def _speech(self, job: _Job, text, codes, complete: bool = True) -> np.ndarray:
        """The speech frames of a request's generated groups (see `outputs.speech_of`)."""
        spec = job.spec
        start = self.tok.special_id(spec.speech_start) if spec.speech_start else None
        return outputs.speech_of(
            text,
            codes,
            self.config.speech_empty_ids,
            start,
            self.tok.special_id(spec.speech_end),
            complete=complete,
        )

    def _finish(self, job: _Job, text, codes, res: Result):
        """A request's result from its generated groups (up to its stop group)."""
        new = segments.Prompt(text, codes)
        res.text = outputs.text_of(self.tok, new.text)
        res.sequence, res.prompt_groups = job.prompt + new, job.prompt.groups
        if job.spec.speech_out:
            res.speech = self._speech(job, new.text, new.codes)

    def _stream_batch(
        self,
        jobs: list[_Job],
        results: list[Result],
        chunk_groups: int,
        decoder: StreamingDecoder,
    ) -> Iterator[AudioChunk]:
        width, args, kw = self._batch(jobs)
        rows = range(len(jobs))
        text: list[list[np.ndarray]] = [[] for _ in rows]
        codes: list[list[np.ndarray]] = [[] for _ in rows]
        pieces: list[list[np.ndarray]] = [[] for _ in rows]
        sent, live = [0] * len(jobs), set(rows)
        for chunk in generate_chunks(*args, chunk_groups=chunk_groups, **kw):
            new: list[np.ndarray | None] = [None] * len(jobs)
            ending: list[int] = []
            for row in sorted(live):
                text[row].append(chunk.text[row])
                codes[row].append(chunk.codes[row])
                if chunk.done[row] or chunk.last:
                    ending.append(row)
                if not jobs[row].spec.speech_out:
                    continue
                end = int(chunk.lengths[row]) - width if row in ending else None
                frames = self._speech(
                    jobs[row],
                    np.concatenate(text[row])[:end],
                    np.concatenate(codes[row])[:end],
                    complete=row in ending,
                )
                new[row], sent[row] = frames[sent[row] :], len(frames)
            ready = decoder.push(new)
            tails = decoder.finish(ending)
            for row in sorted(live):
                wav = np.concatenate([ready[row], tails[row]])
                if len(wav):
                    pieces[row].append(wav)
                if row not in ending:
                    if len(wav):
                        yield AudioChunk(jobs[row].index, wav)
                    continue
                live.discard(row)
                job, res = jobs[row], results[jobs[row].index]
                end = int(chunk.lengths[row]) - width
                self._finish(
                    job, np.concatenate(text[row])[:end], np.concatenate(codes[row])[:end], res
                )
                if res.speech is not None:
                    res.wav = (
                        np.concatenate(pieces[row])
                        if pieces[row]
                        else outputs.wav_of(self.audio.tokenizer, res.speech)
                    )
                    wav = wav if pieces[row] else res.wav
                yield AudioChunk(job.index, wav, res)

    def _decode(self, results: list[tuple[Result, np.ndarray | None]]):
        """The speech of a batch through the audio tokenizer at once (1500-frame chunks); each
        result comes with its speech frames (None for a text task)."""
        tokenizer = self.audio.tokenizer
        speaking = [(r, speech) for r, speech in results if speech is not None]
        spoken = [(r, speech) for r, speech in speaking if speech.shape[0]]
        wavs = tokenizer.decode([speech for _, speech in spoken]) if spoken else []
        for (r, _), wav in zip(spoken, wavs):
            r.wav = wav
        for r, speech in speaking:
            if not speech.shape[0]:
                r.wav = outputs.wav_of(tokenizer, speech)


def _failed(job: _Job, error: Exception) -> Result:
    return Result(job.request, error=f"generation failed ({type(error).__name__}: {error})")
