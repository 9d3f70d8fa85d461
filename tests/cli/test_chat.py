"""flamingo chat: dialogue records as prompts, answers streamed as their tokens come, the Chat
session, the filter, and the command on a real terminal (a pty), all on the bundled toy model,
whose world says what its images show (blue-diamond.png is a blue diamond)."""
import fcntl
import importlib.util
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flamingo_cli.cli import cli
from flamingo_cli.cli.chat import _answer, render_dialogue
from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluation.benchmarks.visdial import read_visdial
from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT
from flamingo_cli.inference.chat import ANSWER_ENDS, Chat, Shots, answer_records, prompt_record
from flamingo_cli.inference.generation import _settled, cut_text, generate_records, stream_record
from flamingo_cli.inference.media import MediaResolver, load_for_inference
from flamingo_cli.inference.prefix_cache import PrefixCache
from flamingo_cli.inference.prompting import load_template

TOY = Path(__file__).resolve().parents[2] / "examples" / "toy"
DIAMOND, CIRCLE = str(TOY / "images" / "blue-diamond.png"), str(TOY / "images" / "purple-circle.png")
SHOTS = [str(TOY / "shots" / f"shot-0{i}.png") for i in range(2)]  # a pink diamond, a cyan triangle
COLOUR, SHAPE = "What colour is the shape?", "What shape is it?"  # the toy world's questions
FLAMINGO = str(Path(sys.executable).parent / "flamingo")
READLINE = importlib.util.find_spec("readline") is not None  # chat's line editing, where Python has it


@pytest.fixture(scope="module")
def toy():
    return load_for_inference(BUNDLED_CHECKPOINT)


def session(toy, **kw) -> Chat:
    model, media = toy
    return Chat(model, media, render_dialogue, **kw)


# -- dialogue records as prompts ---------------------------------------------------------------

def test_a_dialogue_is_its_image_then_the_text_visdial_evaluation_writes():
    record = {"id": 7, "image": DIAMOND, "caption": "a shape on white",
              "history": [{"question": "What colour is the shape", "answer": "blue"}], "question": SHAPE}
    prompt = prompt_record(record, render_dialogue)
    assert prompt["prompt"] == ("<image>a shape on white. Question: What colour is the shape? Answer: blue "
                                "Question: What shape is it? Answer:")
    assert prompt["media"] == [DIAMOND] and prompt["question"] == SHAPE


def test_a_visdial_round_reads_as_chat_would_ask_it():
    """VisDial's records carry the prompt text evaluation renders: chat renders the same from
    their caption, history and question."""
    records = read_visdial(Path(__file__).resolve().parents[1] / "fixtures" / "visdial", "val", rounds="all")
    assert any(r["history"] for r in records) and all(r["caption"] for r in records)
    for record in records:
        assert prompt_record(record, render_dialogue)["prompt"] == "<image>" + record["dialogue"]


def test_shots_come_first_chosen_and_rendered_as_generate_shots_does():
    support = [{"id": f"s{i}", "image": path, "question": COLOUR, "answer": colour}
               for i, (path, colour) in enumerate(zip(SHOTS, ["pink", "cyan"]))]
    record = {"id": "chat", "image": DIAMOND, "question": SHAPE}
    shots = Shots(load_template("vqa"), support, k=2, select="first")
    prompt = prompt_record(record, render_dialogue, shots)
    assert prompt["prompt"] == ("<image>Question: What colour is the shape? Answer: pink<|endofchunk|>"
                                "<image>Question: What colour is the shape? Answer: cyan<|endofchunk|>"
                                "<image>Question: What shape is it? Answer:")
    assert prompt["media"] == [*SHOTS, DIAMOND] and prompt["shots"] == ["s0", "s1"]
    zero = prompt_record(record, render_dialogue, Shots(load_template("vqa"), support, k=0, select="first"))
    assert zero["prompt"] == ("Question: What colour is the shape? Answer: pink<|endofchunk|>"
                              "Question: What colour is the shape? Answer: cyan<|endofchunk|>"
                              "<image>Question: What shape is it? Answer:")
    assert zero["media"] == [DIAMOND]
    at_most = Shots(load_template("vqa"), support, k=4, select="first", at_most=True)
    assert prompt_record(record, render_dialogue, at_most)["prompt"] == prompt["prompt"]
    with pytest.raises(Exception, match="4 support examples needed but only 2"):
        prompt_record(record, render_dialogue, Shots(load_template("vqa"), support, k=4, select="first"))
    # A template's instruction and BOS are the chat's too (IDEFICS's evaluation prompts have both).
    idefics = prompt_record(record, render_dialogue, Shots(load_template("idefics-eval-vizwiz"), support, k=2,
                                                           select="first"))
    assert idefics["prompt"].startswith("Task: Answer the questions based on the image when possible")
    classify = prompt_record(record, render_dialogue, Shots(load_template("idefics-eval-classification"),
                                                            [{**s, "label": s["answer"]} for s in support], k=2,
                                                            select="first"))
    assert classify["bos"] is False


@pytest.mark.parametrize("change, message", [
    ({"question": None}, "d: no 'question' text"),
    ({"question": "  "}, "d: no 'question' text"),
    ({"caption": 3}, "d: 'caption' must be text"),
    ({"history": {"question": "a", "answer": "b"}}, "d: 'history' must be a list of"),
    ({"history": [{"question": "a"}]}, "d: 'history' must be a list of"),
    ({"question": "Is <image> blue?"}, "d: 'question' contains the media marker <image>"),
    ({"history": [{"question": "a", "answer": "<image>"}]}, "d: 'history[0].answer' contains the media marker"),
    ({"image": None}, "d: no media"),
])
def test_a_bad_dialogue_record_is_one_error_naming_it(change, message):
    record = {"id": "d", "image": DIAMOND, "question": COLOUR, **change}
    with pytest.raises(FlamingoError, match=f"^{re.escape(message)}"):
        prompt_record(record, render_dialogue)


# -- streaming ---------------------------------------------------------------------------------

def test_settled_text_holds_back_what_a_later_token_may_change():
    assert _settled(" a blue ", ANSWER_ENDS) == "a blue"
    assert _settled("a blue Qu", ANSWER_ENDS) == "a blue"  # may become "Question"
    assert _settled("a blue Quiet", ANSWER_ENDS) == "a blue Quiet"
    assert cut_text(" blue Question: What", ANSWER_ENDS) == "blue"
    assert cut_text("blue\nQuestion", ANSWER_ENDS) == "blue"
    assert cut_text(" a blue diamond ", ANSWER_ENDS) == "a blue diamond"


def test_pieces_join_to_the_output_generate_gives(toy):
    model, media = toy
    for prompt in ["<image>Output:", "<image>Question: What colour is the shape? Answer:"]:
        record = {"id": 0, "prompt": prompt, "media": [DIAMOND]}
        for cache in (None, PrefixCache(model)):
            [out] = generate_records(model, [record], media, num_beams=1, max_new_tokens=20, prefix_cache=cache)
            pieces = list(stream_record(model, record, media, max_new_tokens=20, prefix_cache=cache))
            assert "".join(pieces) == out["output"]
    assert pieces == ["blue"]
    caption = {"id": 0, "prompt": "<image>Output:", "media": [DIAMOND]}
    assert list(stream_record(model, caption, media)) == ["a", " blue", " diamond"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pieces_come_as_the_tokens_do_and_join_to_generate_s_output(make_model, family):
    """A random LM's byte-level BPE answers: words of several tokens, characters of several bytes."""
    model = make_model(family, gates=0.5)
    media = MediaResolver(model)
    calls, generate = [], model.generate
    model.generate = lambda *a, **kw: calls.append(1) or generate(*a, **kw)
    for prompt in ["What colour is the shape?", "a red circle", "Question: how many shapes"]:
        record = {"id": 0, "prompt": prompt, "media": []}
        [out] = generate_records(model, [record], media, num_beams=1, max_new_tokens=16)
        text = out["output"]
        calls.clear()
        pieces, made = [], []
        for piece in stream_record(model, record, media, max_new_tokens=16):
            pieces.append(piece)
            made.append(len(calls))
        assert "".join(pieces) == text and len(pieces) > 1
        assert made == sorted(set(made)) and made[0] < len(calls), "each piece as soon as its token is made"
        marker = next(c for c in text[len(text) // 2:] if c != "\ufffd" and not c.isspace())
        calls.clear()
        cut = "".join(stream_record(model, record, media, max_new_tokens=16, stop_at=[marker]))
        assert cut == cut_text(text, [marker]) and len(calls) < 16, "decoding stops at the marker"


@pytest.mark.parametrize("text, stop_at, pieces, calls", [
    (" café au lait", (), ["c", "a", "f", "é", " a", "u", " l", "a", "i", "t"], 13),  # é is two byte tokens
    (" a blue Question: what", ANSWER_ENDS, ["a", " b", "lu", "e"], 9),  # "Qu" might begin "Question"
    (" red\nQuestion", ANSWER_ENDS, ["red"], 2),
])
def test_a_piece_is_text_no_later_token_changes(make_model, text, stop_at, pieces, calls):
    """Scripted tokens (the tiny byte-level BPE's own for `text`, then <|endofchunk|>): what is
    given out when, and where decoding stops."""
    model = make_model("gpt2")
    script = [*model.tokenizer(text).input_ids, model.tokenizer.convert_tokens_to_ids("<|endofchunk|>")]
    prompt = model.tokenizer("Answer:", return_tensors="pt").input_ids

    def scripted(ids, visual, **kw):
        assert ids[0].tolist() == prompt[0].tolist() + script[:len(made)], "each call continues the last"
        made.append(script[len(made)])
        return torch.tensor([[made[-1]]])

    made = []
    model.generate = scripted
    record = {"id": 0, "prompt": "Answer:", "media": []}
    assert list(stream_record(model, record, MediaResolver(model), max_new_tokens=20, stop_at=stop_at)) == pieces
    assert len(made) == calls


# -- the session ------------------------------------------------------------------------------

def test_a_chat_keeps_its_rounds_and_answers_as_the_filter_does(toy):
    model, media = toy
    chat = session(toy)
    with pytest.raises(ArtifactError, match="no image"):
        list(chat.ask(COLOUR))
    chat.attach(DIAMOND)
    first = chat.record(COLOUR)
    assert "".join(chat.ask(COLOUR)) == "blue"
    second = chat.record(SHAPE)
    assert second == {"id": "chat", "image": DIAMOND, "history": [{"question": COLOUR, "answer": "blue"}],
                      "question": SHAPE}
    assert "".join(chat.ask(SHAPE)) == "diamond"
    assert [r["output"] for r in answer_records(model, [first, second], media, render_dialogue)] == ["blue", "diamond"]
    assert chat.history == [{"question": COLOUR, "answer": "blue"}, {"question": SHAPE, "answer": "diamond"}]

    stopped = chat.ask("What colour is it?")
    next(stopped)
    stopped.close()  # Ctrl-C half-way
    assert len(chat.history) == 2
    with pytest.raises(ArtifactError, match="^nope.png: no such file$"):
        chat.attach("nope.png")
    assert chat.image == DIAMOND and len(chat.history) == 2
    chat.reset()
    assert chat.history == [] and chat.image == DIAMOND
    chat.attach(CIRCLE, caption="a picture")
    assert chat.record(COLOUR) == {"id": "chat", "image": CIRCLE, "caption": "a picture", "history": [],
                                   "question": COLOUR}
    assert "".join(chat.ask(COLOUR)) == "purple"


def test_beams_answer_in_one_piece_what_the_filter_gives(toy):
    model, media = toy
    chat = session(toy, num_beams=3)
    chat.attach(DIAMOND)
    record = chat.record(SHAPE)
    pieces = list(chat.ask(SHAPE))
    [out] = answer_records(model, [record], media, render_dialogue, num_beams=3)
    assert pieces == [out["output"]] == ["diamond"]


def test_an_answer_stopped_by_ctrl_c_is_not_kept(toy, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        yield "bl"
        raise KeyboardInterrupt

    monkeypatch.setattr("flamingo_cli.inference.chat.stream_record", interrupted)
    chat = session(toy)
    chat.attach(DIAMOND)
    _answer(chat, COLOUR, terminal=True)
    out, err = capsys.readouterr()
    assert out == "bl\n" and err == "flamingo chat: answer stopped, and not kept in the dialogue\n"
    assert chat.history == []
    with pytest.raises(KeyboardInterrupt):  # from a pipe, Ctrl-C ends the run (130), as in any stage
        _answer(chat, COLOUR, terminal=False)


# -- the command from a pipe -------------------------------------------------------------------

def invoke(args, stdin=""):
    return CliRunner().invoke(cli, ["chat", "-q", *args], input=stdin)


def test_the_filter_answers_dialogue_records_with_paths_relative_to_their_file(tmp_path, monkeypatch):
    shutil.copy(DIAMOND, tmp_path / "diamond.png")
    records = [{"id": "a", "image": "diamond.png", "question": COLOUR},
               {"id": "b", "image": "diamond.png", "history": [{"question": COLOUR, "answer": "blue"}],
                "question": SHAPE}]
    (tmp_path / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(TOY)
    r = invoke(["--records", str(tmp_path / "dialogues.jsonl")])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    moved = str(tmp_path / "diamond.png")
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        {**records[0], "image": moved, "output": "blue"}, {**records[1], "image": moved, "output": "diamond"}]
    piped = invoke([], stdin="".join(json.dumps({**r, "image": DIAMOND}) + "\n" for r in records))
    assert piped.exit_code == 0 and [json.loads(line)["output"] for line in piped.stdout.splitlines()] == [
        "blue", "diamond"]


@pytest.mark.parametrize("stdin, error", [
    ('{"id": "a", "image": "x.png", "question": "q"}\n{"id": \n', "<stdin>: line 2: malformed JSON (Expecting value)"),
    ('{"id": "a", "image": "%s"}\n' % DIAMOND, "a: no 'question' text"),
    ('{"id": "a", "image": "%s", "question": "q", "history": "none"}\n' % DIAMOND,
     "a: 'history' must be a list of {\"question\": ..., \"answer\": ...} rounds"),
    ('{"id": "a", "image": "nope.png", "question": "q"}\n', "nope.png: no such file"),
])
def test_bad_records_are_one_line_errors(stdin, error):
    r = invoke([], stdin=stdin)
    assert r.exit_code == 1 and r.stdout == "" and r.stderr == f"Error: {error}\n"


def test_from_a_pipe_each_line_is_a_question_or_a_command():
    r = invoke([DIAMOND], stdin=f"{COLOUR}\n\n{SHAPE}\n/reset\n/image {CIRCLE}\n{COLOUR}\n/quit\n{SHAPE}\n")
    assert r.exit_code == 0 and r.stdout == "blue\ndiamond\npurple\n" and r.stderr == ""
    r = invoke([DIAMOND], stdin=f"{COLOUR}\n/colour\n{SHAPE}\n")
    assert r.exit_code == 1 and r.stdout == "blue\n"
    assert r.stderr == "Error: unknown command /colour (/help lists them)\n"
    r = invoke([DIAMOND], stdin=f"{COLOUR}\n".encode() + b"\xff\xfe\n")
    assert r.exit_code == 1 and r.stdout == "blue\n" and r.stderr == "Error: <stdin>: line 2: not UTF-8 text\n"
    r = invoke(["nope.png"], stdin=f"{COLOUR}\n")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr == "Error: nope.png: no such file\n"


@pytest.mark.parametrize("args", [[DIAMOND, "--records", "-"], ["--caption", "a shape"], [DIAMOND, "-o", "out.jsonl"]])
def test_options_of_the_other_mode_are_usage_errors(args):
    r = invoke(args, stdin=f"{COLOUR}\n")
    assert r.exit_code == 2 and r.stdout == "" and "Usage:" in r.stderr


# -- the command on a terminal -----------------------------------------------------------------

def _controlling_terminal():
    """The pty becomes the child's terminal, and Ctrl-C interrupts it as a terminal's would, even
    where the suite itself runs with SIGINT ignored (a background job of a script: nohup ... &)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`flamingo chat ...` with a pty as its controlling terminal, stdin and stdout (so Ctrl-C
    and Ctrl-D are typed keys, and answers go where a user sees them), stderr kept apart."""

    def __init__(self, *args, cwd=TOY / "images"):
        self.primary, secondary = pty.openpty()
        # No echo (readline then echoes none either), so the terminal shows the answers alone,
        # whether a line is typed before readline takes the terminal over or after.
        attrs = termios.tcgetattr(secondary)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(secondary, termios.TCSANOW, attrs)
        env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1"}  # dumb: no escape sequences from readline
        self.proc = subprocess.Popen([FLAMINGO, "chat", *args], cwd=cwd, env=env, stdin=secondary, stdout=secondary,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_controlling_terminal)
        self.name = os.ttyname(secondary)
        os.close(secondary)
        self.out, self.err = b"", b""
        self.reading = [self.primary, self.proc.stderr.fileno()]

    def until(self, done, timeout=120):
        """Read both until done(self) holds; a hang fails the test instead of blocking it."""
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; stdout {self.out!r}, stderr {self.err!r}"
            if not self.reading:  # both closed: the child is ending, or has ended without `done`
                self.proc.wait(timeout=left)
                assert done(self), f"exited {self.proc.returncode}; stdout {self.out!r}, stderr {self.err!r}"
                return
            for fd in select.select(self.reading, [], [], min(left, 1))[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the child has closed the terminal
                    data = b""
                if not data:
                    self.reading.remove(fd)
                elif fd == self.primary:
                    self.out += data
                else:
                    self.err += data

    def prompts(self) -> int:
        return self.err.count(b"> ")

    def type(self, keys: bytes) -> None:
        """Keys typed at the prompt, once readline reads the terminal key by key: typed before,
        a line is still read, but the end of input (Ctrl-D) of the line-by-line mode is lost."""
        def reading_keys(t):
            fd = os.open(t.name, os.O_RDWR | os.O_NOCTTY)
            try:
                return not termios.tcgetattr(fd)[3] & termios.ICANON
            finally:
                os.close(fd)

        self.until(lambda t: t.prompts() and (not READLINE or reading_keys(t)))
        os.write(self.primary, keys)

    def ask(self, line: str, lines: int = 1) -> str:
        """What the terminal shows for a typed line (`lines` of it) by the next prompt."""
        before, shown = self.prompts(), len(self.out)
        self.type(line.encode() + b"\n")
        self.until(lambda t: t.prompts() > before and t.out.count(b"\r\n", shown) >= lines)
        return self.out[shown:].decode()

    def exit_code(self) -> int:
        self.until(lambda t: t.proc.poll() is not None)
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        os.close(self.primary)


@pytest.fixture
def terminal():
    opened = []
    yield lambda *args: opened.append(Terminal(*args)) or opened[-1]
    for t in opened:
        t.close()


def test_a_chat_on_a_terminal_streams_the_answers_the_filter_gives(toy, terminal):
    model, media = toy
    t = terminal("blue-diamond.png")
    t.until(lambda t: t.prompts() == 1)
    assert b"flamingo chat: ask about blue-diamond.png" in t.err
    assert t.ask(COLOUR) == "blue\r\n"
    assert t.ask(SHAPE) == "diamond\r\n"
    assert t.ask("/image nope.png", lines=0) == ""
    assert t.err.endswith(b"> Error: nope.png: no such file\n> ")
    assert t.ask("/image purple-circle.png", lines=0) == ""
    assert t.ask(COLOUR) == "purple\r\n"
    t.type(b"/quit\n")
    assert t.exit_code() == 0
    assert b"> " not in t.out, "the prompt goes to stderr"
    assert b"Traceback" not in t.err

    records = [{"id": "chat", "image": DIAMOND, "question": COLOUR},
               {"id": "chat", "image": DIAMOND, "history": [{"question": COLOUR, "answer": "blue"}], "question": SHAPE},
               {"id": "chat", "image": CIRCLE, "question": COLOUR}]
    filtered = answer_records(model, records, media, render_dialogue, prefix_cache=PrefixCache(model))
    assert [r["output"] for r in filtered] == ["blue", "diamond", "purple"]


def test_ctrl_d_leaves_with_0_and_ctrl_c_at_the_prompt_with_130(terminal):
    t = terminal("blue-diamond.png")
    t.until(lambda t: t.prompts() == 1)
    t.type(b"\x04")
    assert t.exit_code() == 0 and t.err.endswith(b"> \n")
    t = terminal()
    t.until(lambda t: t.prompts() == 1)
    assert b"/image PATH to begin" in t.err
    assert t.ask(COLOUR, lines=0) == "" and t.err.endswith(b"> Error: no image to talk about: attach one first\n> ")
    t.type(b"\x03")
    assert t.exit_code() == 130
    assert t.err.endswith(b"> \nflamingo: interrupted\n") and b"Traceback" not in t.err
