#!/usr/bin/env python3
"""Keyword recall and word error rate of faster-whisper, the reference
CTranslate2 Whisper pipeline, on the recordings `sonora bench local` speaks:
the same model, the same language, the same questions prompt, scored as
`bench local` scores Sonora's recogniser (src/cli/bench/accuracy.rs).

    sonora bench local --no-accuracy --questions 16 --keep-audio /tmp/qa
    python3 -m venv /tmp/fw && /tmp/fw/bin/pip install faster-whisper==1.2.1
    /tmp/fw/bin/python scripts/reference/whisper_recall.py /tmp/qa

faster-whisper computes Whisper's features itself and decodes the whole 30 s
window; `--prompt` is the knowledge base's headings within 600 characters, as
the local engine's prompt (`questions_text(PROMPT_CHARS)`).
"""
import argparse
import glob
import re
import time
import unicodedata

from faster_whisper import WhisperModel

# (question, keywords; "a|b" is one word with two spellings)
QUESTIONS = [
    ("¿Cómo me matriculo en un curso?", ["matriculo", "curso"]),
    ("¿Cuál es el horario de la biblioteca?", ["horario", "biblioteca"]),
    ("¿Cómo puedo renovar un libro prestado?", ["renovar", "libro", "prestado"]),
    (
        "Olvidé la contraseña del portal del estudiante, ¿qué hago?",
        ["olvide", "contrasena", "portal", "estudiante"],
    ),
    ("¿Dónde pido una constancia de estudios?", ["pido", "constancia", "estudios"]),
    ("¿Qué becas puedo solicitar?", ["becas", "solicitar"]),
    ("¿Cómo obtengo el carné de estudiante?", ["obtengo", "carne|carnet", "estudiante"]),
    ("¿Qué documentos necesito para la matrícula?", ["documentos", "necesito", "matricula"]),
]
VOICES = ["es", "es-419"]
PROMPT_CHARS = 600


def words(text):
    folded = unicodedata.normalize("NFD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).lower()
    return [w for w in re.split(r"[^\w]+", folded) if w]


def word_errors(reference, transcript):
    ref, hyp = words(reference), words(transcript)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref):
        current = [i + 1] * (len(hyp) + 1)
        for j, h in enumerate(hyp):
            current[j + 1] = min(previous[j] + (r != h), previous[j + 1] + 1, current[j] + 1)
        previous = current
    return previous[len(hyp)], len(ref)


def questions_prompt(knowledge):
    prompt = ""
    for path in sorted(glob.glob(f"{knowledge}/*.md")):
        for line in open(path, encoding="utf-8"):
            if not line.startswith("## "):
                continue
            question = line[3:].strip()
            separator = " " if prompt else ""
            if len((prompt + separator + question).encode()) > PROMPT_CHARS:
                return prompt
            prompt += separator + question
    return prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recordings", help="the directory `bench local --keep-audio` wrote")
    parser.add_argument("--model", default="models/whisper-base")
    parser.add_argument("--knowledge", default="knowledge")
    parser.add_argument("--beams", default="3,5")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = WhisperModel(args.model, device="cpu", compute_type="int8", cpu_threads=args.threads)
    prompts = [("no prompt", None), ("questions prompt", questions_prompt(args.knowledge))]
    for name, prompt in prompts:
        for beam in [int(b) for b in args.beams.split(",")]:
            heard = keywords = errors = total = 0
            times = []
            for voice in VOICES:
                for i, (question, wanted) in enumerate(QUESTIONS):
                    started = time.perf_counter()
                    segments, _ = model.transcribe(
                        f"{args.recordings}/q{i}-{voice}.wav",
                        language="es",
                        beam_size=beam,
                        initial_prompt=prompt,
                        without_timestamps=True,
                        temperature=0.0,
                        condition_on_previous_text=False,
                        vad_filter=False,
                    )
                    transcript = " ".join(s.text.strip() for s in segments)
                    times.append(time.perf_counter() - started)
                    found = words(transcript)
                    hits = sum(any(k in found for k in w.split("|")) for w in wanted)
                    heard, keywords = heard + hits, keywords + len(wanted)
                    e, n = word_errors(question, transcript)
                    errors, total = errors + e, total + n
                    print(f"  {voice} {question!r} -> {transcript!r}")
            times.sort()
            print(
                f"faster-whisper, {name}, beam {beam}: keyword recall {heard}/{keywords} "
                f"= {100 * heard / keywords:.1f} %, word error rate {100 * errors / total:.0f} %, "
                f"p50 {1000 * times[len(times) // 2]:.0f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
