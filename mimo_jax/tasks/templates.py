"""Fixed strings of the task prompts: the official template lists and chat strings,
shared by the prompt builders, the training sequences and the demo tokenizer."""

ASR_TEMPLATES_ZH = (
    "请将这段语音转换为文字",
    "帮我识别这个音频文件中的内容",
    "把这段录音转成文本",
    "请转录这段语音",
    "将音频内容转换成文字格式",
    "识别并转写这段语音",
    "把语音内容写成文字",
    "转录这个音频片段",
    "将这段对话转换为文本",
    "麻烦帮我把这段录音整理成详细的文字记录",
)
ASR_TEMPLATES_EN = (
    "Please transcribe this audio file",
    "Convert this speech recording to text",
    "Transcribe the following voice message",
    "Turn this audio into readable text",
    "Please convert the recording to written format",
    "Transcribe what you hear in this audio",
    "Convert this spoken content to text",
    "Please write down what is said in this recording",
    "Transcribe this voice recording",
    "Could you please help me transcribe this important recording?",
    "Would you mind converting this voice message into a readable text format?",
    "I'd really appreciate it if you could turn this audio file into a written document",
)
ASR_TEMPLATES = ASR_TEMPLATES_ZH + ASR_TEMPLATES_EN

TTS_TEMPLATES_ZH = (
    "请将这段文字转换为语音",
    "帮我把这个文本读出来",
    "将这些文字生成音频",
    "请朗读这段内容",
    "把这段话转换成语音文件",
    "生成这段文字的语音版本",
    "请用语音播报这些内容",
    "将文本转换为可听的音频",
    "帮我朗读这段文字",
    "把这些内容念出来",
)
TTS_TEMPLATES_EN = (
    "Please convert this text to speech",
    "Turn this writing into audio",
    "Generate speech from this text",
    "Read this content out loud",
    "Convert these words to voice",
    "Create an audio version of this text",
    "Please vocalize this content",
    "Turn this text into audible format",
    "Help me convert this writing to speech",
    "Make this text into spoken audio",
)

CAPTION_QUESTIONS = (
    "Describe this audio.",
    "What can you hear in this recording?",
    "Write a short caption for this audio clip.",
    "Describe the speaker and the way they speak.",
)

INSTRUCT_TTS_SYSTEM = "你需要根据指定的风格指令和文本内容来生成语音。"
INSTRUCT_TTS_VOICE_SYSTEM = (
    "你需要根据指定的风格指令和文本内容来生成和语音prompt具有相同音色的语音。你的音色应该是："
)
VOICE_SYSTEM = "Your voice should be:"
DEFAULT_SYSTEM_PROMPT = (
    "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise."
)
THINK_OFF = "<think>\n\n</think>\n"
THINK_ON = "<think>\n"
THINK_CLOSE = "\n</think>\n"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_start|>assistant\n"
SYSTEM = "<|im_start|>system\n"
END = "<|im_end|>\n"

# Fixed text of the chat format, also fed to the demo tokenizer's training.
CHAT_STRINGS = (
    USER,
    END,
    ASSISTANT,
    SYSTEM,
    THINK_OFF,
    THINK_ON,
    THINK_CLOSE,
    "[Int]:",
    "\n",
    " \n\n",
)

ALL_PROMPT_TEXT = (
    ASR_TEMPLATES
    + TTS_TEMPLATES_ZH
    + TTS_TEMPLATES_EN
    + CAPTION_QUESTIONS
    + (INSTRUCT_TTS_SYSTEM,)
    + CHAT_STRINGS
)


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)
