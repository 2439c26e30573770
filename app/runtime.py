"""What a process needs to do its work, built once from Settings: engine, policy, settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from app.config import Settings
from app.db import make_engine
from app.domain.policy import Policy
from app.policy_file import load_policy


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    policy: Policy

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        return cls(
            settings=settings,
            engine=make_engine(settings.database_url),
            policy=load_policy(settings.policy_path),
        )
