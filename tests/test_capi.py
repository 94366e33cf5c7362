"""The C API (include/mistral_cuda.h) as an embedder meets it: built with -DMC_BUILD_PYTHON=OFF,
installed to a temporary prefix, found by a separate CMake project (tests/capi/) with
find_package(mistral_cuda CONFIG) and by pkg-config, and run on tiny checkpoints with the real
v1 tokenizer (chat_models.py). Greedy tokens must equal transformers' greedy continuation and the
Python engine's; the C program itself checks every error path and lifetime rule, and runs again
under AddressSanitizer + UndefinedBehaviorSanitizer. The example service (examples/chat_service)
is built against the same prefix and its prompt ids checked against mistral_common.

Build directories build-capi/ and build-capi-asan/ sit in the repository (git-ignored) and are
reused between runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chat_models as cm
import mistral_cuda as mc
import tiny_models as tm

ROOT = Path(__file__).resolve().parent.parent
JOBS = os.environ.get("MC_BUILD_JOBS", "2")
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                                reason="needs cmake and ninja")


def run(cmd, timeout=900, env=None, **kw) -> subprocess.CompletedProcess:
    full_env = None if env is None else {**os.environ, **env}
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {out.returncode}\n"
                             f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}")
    return out


def build_and_install(build: Path, prefix: Path, flags: str = "") -> None:
    """The C library alone (no Python, no CUDA) -> prefix; the build directory is reused."""
    run(["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DMC_ENABLE_CUDA=OFF", "-DMC_BUILD_PYTHON=OFF",
         # Proves the C library needs neither: a find_package for them would fail the configure.
         "-DCMAKE_DISABLE_FIND_PACKAGE_Python=ON", "-DCMAKE_DISABLE_FIND_PACKAGE_pybind11=ON",
         f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_SHARED_LINKER_FLAGS={flags}"])
    run(["cmake", "--build", build, "-j", JOBS, "--target", "mistral_cuda"])
    run(["cmake", "--install", build, "--prefix", prefix])


def build_project(source: Path, build: Path, prefix: Path, flags: str = "") -> None:
    run(["cmake", "-S", source, "-B", build, "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
         f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={flags}"])
    run(["cmake", "--build", build, "-j", JOBS])


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("capi_prefix")
    build_and_install(ROOT / "build-capi", prefix)
    return prefix


@pytest.fixture(scope="module")
def test_capi(prefix, tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("capi_test_build")
    build_project(ROOT / "tests" / "capi", build, prefix)
    run([build / "header_cxx"])  # the header compiled as C++11, and its symbols linked
    return build / "test_capi"


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("v1", tmp_path_factory)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> cm.ChatModel:
    return cm.get_chat_model("eos", tmp_path_factory)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`mistral-cuda demo`'s checkpoint (mistral_cuda/demo.py: dim 256, 4 layers, vocab 32000,
    window 256, random weights, the real v1 tokenizer), with transformers holding its weights."""
    from transformers import MistralForCausalLM

    from mistral_cuda.demo import demo_checkpoint

    path, _ = demo_checkpoint(tmp_path_factory.mktemp("capi_demo"))
    return tm.TinyModel(path, MistralForCausalLM.from_pretrained(str(path), torch_dtype="float32").eval())


@pytest.fixture(scope="module")
def error_dirs(mistral_short, v1, tmp_path_factory) -> list[str]:
    """The errors mode's arguments: the v1 model, a full-attention model (max_seq_len 32), a
    checkpoint whose weights file is cut in the middle of its data, a path that does not exist."""
    broken = tmp_path_factory.mktemp("capi_broken")
    shutil.copy(v1.path / "config.json", broken / "config.json")
    tm.corrupt_truncated_in_data(v1.path / "model.safetensors", broken / "model.safetensors")
    return [str(v1.path), str(mistral_short.path), str(broken), str(broken / "no-such-model")]


PROMPTS = [
    [1, 415, 8086, 3154, 349, 4376, 1780, 304, 6100, 28723],
    [1, 1014, 28705],
    [1] + [300 + t for t in tm.random_ids(40, 31000, tm.seed_of("capi-long"))],  # longer than the window (16)
]


def ids_arg(ids) -> str:
    return ",".join(str(i) for i in ids)


def parse_requests(stdout: str) -> dict[int, dict]:
    """The 'request <i> finish=... stop_token=... tokens=... logprobs=...' lines."""
    out = {}
    for m in re.finditer(r"^request (\d+) finish=(\w+) stop_token=(-?\d+) tokens=([\d,]*) logprobs=([-\d.,e]*)$",
                         stdout, re.M):
        out[int(m[1])] = {
            "finish": m[2],
            "stop_token": int(m[3]),
            "tokens": [int(t) for t in m[4].split(",") if t],
            "logprobs": [float(v) for v in m[5].split(",") if v],
        }
    return out


def test_installed_package_layout(prefix):
    """cmake --install: library, header, CMake config + version + targets, pkg-config file; the
    library exports the mc_* functions and nothing else."""
    lib = prefix / "lib"
    for rel in ["include/mistral_cuda.h", "lib/libmistral_cuda.so", "lib/pkgconfig/mistral_cuda.pc",
                "lib/cmake/mistral_cuda/mistral_cudaConfig.cmake",
                "lib/cmake/mistral_cuda/mistral_cudaConfigVersion.cmake",
                "lib/cmake/mistral_cuda/mistral_cudaTargets.cmake"]:
        assert (prefix / rel).is_file(), rel
    assert not list(prefix.glob("**/_C*.so")), "-DMC_BUILD_PYTHON=OFF must not build the module"
    symbols = run(["nm", "-D", "--defined-only", lib / "libmistral_cuda.so"]).stdout.split("\n")
    names = sorted(line.split()[-1] for line in symbols if line.strip())
    assert names and all(n.startswith("mc_") for n in names), [n for n in names if not n.startswith("mc_")][:10]
    header = (prefix / "include/mistral_cuda.h").read_text()
    declared = set(re.findall(r"MC_API [^;]*?\b(mc_\w+)\(", header))
    assert declared == set(names)


def test_version_is_one(prefix):
    """MC_VERSION_STRING, the CMake package version, pkg-config and pyproject agree."""
    version = header_version()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([\d.]+)"', pyproject, re.M)[1] == version
    config_version = (prefix / "lib/cmake/mistral_cuda/mistral_cudaConfigVersion.cmake").read_text()
    assert f'set(PACKAGE_VERSION "{version}")' in config_version
    env = {"PKG_CONFIG_PATH": str(prefix / "lib/pkgconfig")}
    assert run(["pkg-config", "--modversion", "mistral_cuda"], env=env).stdout.strip() == version


def header_version() -> str:
    return re.search(r'#define MC_VERSION_STRING "([\d.]+)"', (ROOT / "include/mistral_cuda.h").read_text())[1]


@pytest.mark.skipif(shutil.which("pkg-config") is None, reason="needs pkg-config")
def test_pkg_config_builds_a_program(prefix, tmp_path):
    """cc $(pkg-config --cflags --libs mistral_cuda) works from the installed prefix alone."""
    env = {"PKG_CONFIG_PATH": str(prefix / "lib/pkgconfig")}
    flags = run(["pkg-config", "--cflags", "--libs", "mistral_cuda"], env=env).stdout.split()
    includes = [Path(f[2:]).resolve() for f in flags if f.startswith("-I")]
    assert includes == [(prefix / "include").resolve()], flags
    assert "-lmistral_cuda" in flags
    source = tmp_path / "version.c"
    source.write_text('#include <mistral_cuda.h>\n#include <stdio.h>\n'
                      'int main(void) { printf("%s %s\\n", mc_version(), mc_status_str(MC_ERR_NOT_FOUND)); return 0; }\n')
    exe = tmp_path / "version"
    run(["cc", "-std=c99", "-Wall", "-Werror", source, "-o", exe, *flags, f"-Wl,-rpath,{prefix / 'lib'}"])
    assert run([exe]).stdout.split() == [header_version(), "MC_ERR_NOT_FOUND"]


def test_greedy_matches_transformers_and_python_engine(test_capi, v1):
    """Three prompts (one longer than the sliding window) through one C engine at once: the
    tokens equal transformers' greedy continuation and the Python engine's, and the logprobs
    equal the Python engine's."""
    n = 12
    out = run([test_capi, "generate", v1.path, n, 1, *map(ids_arg, PROMPTS)]).stdout
    assert "generate: ok" in out
    got = parse_requests(out)
    assert sorted(got) == list(range(len(PROMPTS)))
    engine = cm.load_engine(v1)
    python = engine.generate(PROMPTS, mc.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0))
    for i, prompt in enumerate(PROMPTS):
        expected, gaps = cm.hf_greedy(v1.model, prompt, n)
        assert min(gaps) > 1e-3, "ambiguous argmax: pick another prompt"
        assert got[i]["tokens"] == expected, f"prompt {i}: C vs transformers"
        assert got[i]["tokens"] == python[i].token_ids, f"prompt {i}: C vs the Python engine"
        assert got[i]["finish"] == "length" == python[i].finish_reason
        py_logprobs = [lp.logprob for lp in python[i].logprobs]
        assert got[i]["logprobs"] == pytest.approx(py_logprobs, abs=1e-4)
        assert all(v <= 0 for v in got[i]["logprobs"])


def test_demo_checkpoint_greedy_matches(test_capi, demo):
    """The same on the demo checkpoint, two prompts at once."""
    n = 8
    prompts = PROMPTS[:2]
    got = parse_requests(run([test_capi, "generate", demo.path, n, 1, *map(ids_arg, prompts)]).stdout)
    python = cm.load_engine(demo).generate(prompts, mc.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for i, prompt in enumerate(prompts):
        expected, gaps = cm.hf_greedy(demo.model, prompt, n)
        assert min(gaps) > 1e-4, "ambiguous argmax: pick another prompt"
        assert got[i]["tokens"] == expected == python[i].token_ids, f"prompt {i}"


def test_eos_ends_a_request_unless_ignore_eos(test_capi, eos_model):
    """The checkpoint's eos_token_id (config.json) ends greedy decoding where transformers emits
    it; ignore_eos goes on to max_tokens."""
    n = 24
    prompt = ids_arg(cm.EOS_PROMPT_IDS)
    stopped = parse_requests(run([test_capi, "generate", eos_model.path, n, 0, prompt]).stdout)[0]
    assert stopped["finish"] == "stop"
    assert stopped["tokens"] == eos_model.greedy_before_eos + [cm.EOS_ID]
    assert stopped["stop_token"] == cm.EOS_ID
    python = cm.load_engine(eos_model).generate([cm.EOS_PROMPT_IDS], mc.SamplingParams(max_tokens=n, temperature=0.0))
    assert python[0].finish_reason == "stop" and python[0].token_ids == stopped["tokens"]
    going = parse_requests(run([test_capi, "generate", eos_model.path, n, 1, prompt]).stdout)[0]
    assert going["finish"] == "length" and len(going["tokens"]) == n
    assert going["tokens"][: len(stopped["tokens"])] == stopped["tokens"]


def test_cancel_and_release(test_capi, v1):
    """Four copies of one prompt; after 3 steps one is cancelled (it keeps its 3 tokens and reads
    as finished) and one released; the other two finish with the full greedy continuation."""
    out = run([test_capi, "cancel", v1.path, ids_arg(PROMPTS[0])]).stdout
    assert "cancel: ok" in out
    expected, _ = cm.hf_greedy(v1.model, PROMPTS[0], 12)
    cancelled = [int(t) for t in re.search(r"^cancelled tokens=([\d,]+)$", out, re.M)[1].split(",")]
    assert cancelled == expected[:3]
    got = parse_requests(out)
    assert got[0]["tokens"] == got[3]["tokens"] == expected


def test_client_threads_share_one_engine(test_capi, v1):
    """Eight client threads add and poll their requests while one thread steps; seeded sampling
    gives equal tokens to clients with equal seeds, whatever the batch."""
    assert "threads: ok" in run([test_capi, "threads", v1.path, ids_arg(PROMPTS[1]), 8]).stdout


def test_progress_callback_and_cancelled_load(test_capi, v1):
    assert "progress: ok" in run([test_capi, "progress", v1.path]).stdout


def test_error_paths(test_capi, error_dirs):
    """NULLs, bad struct sizes, bad handles (freed or made up), bad params and token ids, an
    unknown id, a missing directory (MC_ERR_NOT_FOUND), a broken checkpoint
    (MC_ERR_CHECKPOINT), a request the cache cannot hold (MC_ERR_CACHE_FULL), a prompt past
    max_seq_len, a step with nothing to do (MC_OK): all checked inside the C program."""
    out = run([test_capi, "errors", *error_dirs]).stdout
    assert re.search(r"errors: ok \(\d+ checks\)", out), out


def test_under_address_and_undefined_sanitizers(v1, error_dirs, tmp_path_factory):
    """The library and the C test built with -fsanitize=address,undefined (leak checking on):
    every mode runs clean."""
    prefix = tmp_path_factory.mktemp("capi_asan_prefix")
    build_and_install(ROOT / "build-capi-asan", prefix, SANITIZE + " -O1")
    build = tmp_path_factory.mktemp("capi_asan_test")
    build_project(ROOT / "tests" / "capi", build, prefix, SANITIZE + " -O1")
    exe = build / "test_capi"
    runs = [
        ["generate", v1.path, 6, 1, ids_arg(PROMPTS[0]), ids_arg(PROMPTS[2])],
        ["cancel", v1.path, ids_arg(PROMPTS[0])],
        ["threads", v1.path, ids_arg(PROMPTS[1]), 4],
        ["progress", v1.path],
        ["errors", *error_dirs],
    ]
    for args in runs:
        out = run([exe, *args], env=SANITIZER_ENV)
        assert f"{args[0]}: ok" in out.stdout
        assert "Sanitizer" not in out.stderr and "runtime error" not in out.stderr, out.stderr[-3000:]


@pytest.mark.skipif(shutil.which("pkg-config") is None, reason="needs pkg-config")
def test_example_chat_service(prefix, demo, tmp_path):
    """examples/chat_service built out of tree against the installed package, on the demo
    checkpoint: three user messages served at once. Its prompt ids equal mistral_common's encode_chat_completion, its
    greedy output ids the Python engine's chat(), and its streamed text the tokenizer's decoding
    of those ids."""
    if subprocess.run(["pkg-config", "--exists", "sentencepiece"]).returncode != 0:
        pytest.skip("needs libsentencepiece-dev (tests/install_and_run.sh installs it)")
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    build = tmp_path / "build"
    build_project(ROOT / "examples" / "chat_service", build, prefix)
    messages = ["Write a short poem about fast inference on GPUs.", "What is 2 + 2?",
                "Tell me about the Mistral wind, in three sentences."]
    n = 10
    out = run([build / "chat_service", demo.path, "--max-tokens", n, "--temperature", 0, "--print-ids"],
              input="\n".join(messages) + "\n", timeout=300)
    tokenizer = MistralTokenizer.from_file(str(demo.path / "tokenizer.model"))
    engine = cm.load_engine(demo)
    streamed: dict[int, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^\[(\d+)\] (.*)$", line)
        if m:
            streamed[int(m[1])] = streamed.get(int(m[1]), "") + re.sub(r"\\(.)", lambda e: "\n" if e[1] == "n" else e[1], m[2])
    ids = {int(m[1]): (m[2], m[3]) for m in re.finditer(r"^request (\d+) prompt_ids=([\d,]+) output_ids=([\d,]*)$",
                                                         out.stderr, re.M)}
    assert sorted(ids) == [1, 2, 3], out.stderr
    for i, message in enumerate(messages, start=1):
        prompt_ids = [int(t) for t in ids[i][0].split(",")]
        output_ids = [int(t) for t in ids[i][1].split(",") if t]
        request = ChatCompletionRequest(messages=[UserMessage(content=message)])
        assert prompt_ids == tokenizer.encode_chat_completion(request).tokens
        reply = engine.chat([{"role": "user", "content": message}],
                            mc.SamplingParams(max_tokens=n, temperature=0.0))
        assert output_ids == reply.token_ids
        assert streamed.get(i, "") == tokenizer.decode(output_ids)
