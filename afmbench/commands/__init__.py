"""The ``afmbench`` commands, one module each: ``run``, ``leaderboard`` and ``probe``.

Each takes its own arguments and returns an exit code; a user error is raised as an
:class:`~afmbench.errors.AfmbenchError` for :mod:`afmbench.cli` to print.
"""
