"""Speech synthesised with eSpeak NG (the library and data shipped in the espeakng-loader wheel):
real speech for tests, no downloads. Uses the project's one synthesiser per process, since the
library's output callback is process-wide state."""
import numpy as np

from data_pipelines.espeak import ESpeak


def synthesize(text: str, voice: str = "en", words_per_minute: int = 175) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sample rate (22050))."""
    tts = ESpeak()
    return tts.synth(text, voice, rate=words_per_minute).astype(np.float32) / 32768.0, \
        tts.sample_rate
