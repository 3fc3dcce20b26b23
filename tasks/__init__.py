"""seqio tasks for Spectron, importable as `spectron_tasks`.

Importing this package registers every task with seqio's TaskRegistry:

| task | splits | source |
|---|---|---|
| `spectron_synthetic_counting` | train, validation, validation_unseen_voices | eSpeak NG, offline |
| `spectron_synthetic_counting_files` | the same | the same, from TFRecord shards (checkpointable) |
| `spectron_fsdd_counting` | train, test (takes 0-4) | ../shared/data/fsdd |
| `spectron_counting_down` | validation, validation_unseen_voices | eSpeak NG |
| `spectron_counting_past_22` | validation, validation_unseen_voices | eSpeak NG |
| `spectron_llama_questions` | test | ../shared/data/llama_questions |
| `spectron_librispeech` | TFDS librispeech splits | TFDS (downloads at first use) |
| `spectron_librispeech_w2v_bert` | the same | the same; encoder input: w2v-BERT fbank, F = 160 |

Data folders are read only when a dataset is built, so importing works on any machine. To
register a variant (another front end, target spectrogram, vocabulary, size or folder), call the
module's `register(name, ...)`; `speech_task.register_speech_task` takes any raw-audio source.
"""

from spectron_jax.audio.fbank import W2vBertFbankConfig
from spectron_tasks import (
    counting_knowledge,
    fsdd_counting,
    librispeech,
    llama_questions,
    speech_task,
    synthetic_counting,
    vocabulary,
)

synthetic_counting.register()
synthetic_counting.register("spectron_synthetic_counting_files", file_backed=True)
fsdd_counting.register()
counting_knowledge.register_all()
llama_questions.register()
librispeech.register()
# The paper-scale models read the w2v-BERT 2.0 front end (gin/spectron_base.gin).
librispeech.register("spectron_librispeech_w2v_bert", front_end=W2vBertFbankConfig())

__all__ = [
    "counting_knowledge",
    "fsdd_counting",
    "librispeech",
    "llama_questions",
    "speech_task",
    "synthetic_counting",
    "vocabulary",
]
