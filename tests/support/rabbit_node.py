"""A RabbitMQ node of the test's own (own port, data folder, node name), so that a test can
stop and start the broker under load without disturbing the machine's shared one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_installed() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() or shutil.which("rabbitmq-server") is not None


class RabbitNode:
    def __init__(self, base: Path, port: int, dist_port: int) -> None:
        self.base = base
        self.port = port
        self.dist_port = dist_port
        self.name = f"abltest{port}@localhost"
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            # The Erlang cookie lives in HOME: the node and rabbitmqctl must share it.
            "HOME": str(self.base),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
        }

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(  # noqa: S603 - the machine's rabbitmqctl, fixed arguments
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        subprocess.run(  # noqa: S603 - the machine's rabbitmq-server, fixed arguments
            [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._ctl("wait", str(self.base / "rabbit.pid"), "--timeout", "90")
        deadline = time.monotonic() + 30
        while not self.answers():
            assert time.monotonic() < deadline, "the test's RabbitMQ node did not listen"
            time.sleep(0.1)

    def stop(self) -> None:
        self._ctl("stop", str(self.base / "rabbit.pid"))

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False
