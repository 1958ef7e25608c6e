"""ModelManager without gRPC: concurrency of loads, reloads, and memory given back on unload."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from model_server.loader import build_servable
from model_server.model_manager import ModelManager
from model_server.servable import Servable
from sax.errors import NotFoundError
from sax.v1 import common_pb2
from servables.servable_config import ServableConfig

Status = common_pb2.ModelStatus
KEY = "/sax/test/m"


class GatedBuilder:
    """Builds real TinyLM servables, but only once `gate` is set; counts the builds."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.builds = 0

    def __call__(self, config: ServableConfig, checkpoint: str) -> Servable:
        self.builds += 1
        assert self.gate.wait(10)
        return build_servable(config, checkpoint)


def test_load_while_loading_waits_for_that_load() -> None:
    async def body() -> None:
        builder = GatedBuilder()
        mm = ModelManager("cpu", "1", builder=builder)
        first = asyncio.create_task(mm.load(KEY, "test.TinyLM", "None", {}))
        await asyncio.sleep(0.05)
        assert [m.status for m in mm.statuses()] == [Status.LOADING]
        second = asyncio.create_task(mm.load(KEY, "test.TinyLM", "None", {}))
        await asyncio.sleep(0.05)
        assert not second.done()
        builder.gate.set()
        await asyncio.gather(first, second)
        assert builder.builds == 1
        assert (mm.total_loads, mm.total_unloads) == (1, 0)
        assert [m.status for m in mm.statuses()] == [Status.LOADED]
        await mm.close()

    asyncio.run(body())


def test_cancelled_load_call_still_completes_the_load() -> None:
    async def body() -> None:
        builder = GatedBuilder()
        mm = ModelManager("cpu", "1", builder=builder)
        call = asyncio.create_task(mm.load(KEY, "test.TinyLM", "None", {}))
        await asyncio.sleep(0.05)
        call.cancel()
        builder.gate.set()
        for _ in range(200):
            if mm.loaded_keys():
                break
            await asyncio.sleep(0.01)
        assert mm.loaded_keys() == [KEY]
        await mm.close()

    asyncio.run(body())


def test_other_settings_reload_the_model() -> None:
    async def body() -> None:
        mm = ModelManager("cpu", "1")
        await mm.load(KEY, "test.TinyLM", "None", {})
        await mm.load(KEY, "test.TinyLM", "None", {})
        assert (mm.total_loads, mm.total_unloads) == (1, 0)
        await mm.load(KEY, "test.TinyLM", "None", {"NUM_SAMPLES": "3"})
        assert (mm.total_loads, mm.total_unloads) == (2, 1)
        async with mm.use(KEY) as model:
            assert model.config.num_samples == 3
        await mm.close()
        assert mm.statuses() == []

    asyncio.run(body())


def test_unload_gives_the_memory_back_over_cycles() -> None:
    async def body() -> None:
        mm = ModelManager("cpu", "1")
        refs = []
        for _ in range(3):
            await mm.load(KEY, "test.TinyLM", "None", {})
            async with mm.use(KEY) as model:
                refs.append(weakref.ref(model.servable))
            del model
            await mm.unload(KEY)
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
        assert (mm.total_loads, mm.total_unloads) == (3, 3)
        with pytest.raises(NotFoundError, match="not loaded here"):
            await mm.unload(KEY)
        await mm.close()

    asyncio.run(body())


def test_unload_waits_for_requests_in_flight() -> None:
    async def body() -> None:
        mm = ModelManager("cpu", "1")
        await mm.load(KEY, "test.TinyLM", "None", {})
        async with mm.use(KEY):
            unload = asyncio.create_task(mm.unload(KEY))
            await asyncio.sleep(0.05)
            assert [m.status for m in mm.statuses()] == [Status.UNLOADING]
            assert not unload.done()
            with pytest.raises(NotFoundError, match="UNLOADING"):
                async with mm.use(KEY):
                    pass
        await unload
        assert mm.statuses() == []
        await mm.close()

    asyncio.run(body())
