"""The inference engine: owns the model on one thread; batches every active request in each step."""
from engine.async_engine import AsyncEngine, RequestStream
from engine.config import ContextLengthExceeded, EngineConfig, EngineError, EngineOverloaded, EngineStopped
from engine.core import Engine
from engine.request import FinishReason, SamplingParams, TokenEvent

__all__ = ["AsyncEngine", "ContextLengthExceeded", "Engine", "EngineConfig", "EngineError", "EngineOverloaded",
           "EngineStopped", "FinishReason", "RequestStream", "SamplingParams", "TokenEvent"]
