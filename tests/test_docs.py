"""What the README shows a newcomer must work as written: its Python examples compile, an asyncio example runs its
coroutine, commands say python3 (a stock Debian has no `python`), and documented behaviour the examples rely on
holds (InferenceTimeoutError is an asyncio.TimeoutError, and the docs say so)."""

from __future__ import annotations

import ast
import asyncio
import re

from cluster import AsyncClient
from cluster.errors import ClusterError, InferenceTimeoutError
from tests.harness import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_examples_compile_and_run_their_coroutines():
    blocks = python_blocks()
    assert len(blocks) >= 4, "the README's Python examples were not found"
    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError names the example
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)}
        for name in defined:
            assert f"asyncio.run({name}())" in block, f"the README defines async {name}() and never runs it:\n{block}"


def test_readme_commands_say_python3():
    lines = [line for line in README.splitlines() if not line.lstrip().startswith("```")]  # not the fences
    bare = [line for line in lines if re.search(r"(^|[\s`(])python(\s|$)", line)]
    assert not bare, f"commands with `python` (Debian has python3 only): {bare}"


def test_the_clusters_timeout_is_an_asyncio_timeout_and_the_docs_say_so():
    assert issubclass(InferenceTimeoutError, asyncio.TimeoutError) and issubclass(InferenceTimeoutError, ClusterError)

    async def wrapped():
        try:
            await asyncio.wait_for(raises_cluster_timeout(), 5)
        except InferenceTimeoutError as exc:  # caught first, as the docs advise: the cluster's, naming the model
            return exc.model
        except asyncio.TimeoutError:
            return "asyncio"

    async def raises_cluster_timeout():
        raise InferenceTimeoutError("model 'echo': no answer within 1 s", "echo")

    assert asyncio.run(wrapped()) == "echo"
    for text in (InferenceTimeoutError.__doc__, AsyncClient.__doc__, README):
        assert "asyncio.TimeoutError" in text
