"""A kernel build that was killed must not make later processes wait for ever.

torch's extension builder guards its build directory with a plain ``lock`` file; a builder killed
mid-build leaves it behind and every later ``load`` polls it for ever (a CI run hung on exactly
this). tokenmill's builders take an flock first, which the kernel frees when its holder dies.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

from tokenmill.layers.kernels.extension import exclusive_build


def test_a_baton_left_by_a_killed_build_is_removed(tmp_path):
    build_directory = tmp_path / "tokenmill_native"
    build_directory.mkdir()
    (build_directory / "lock").touch()  # what a killed torch build leaves behind

    with exclusive_build(build_directory):
        assert not (build_directory / "lock").exists()


def test_a_second_builder_waits_for_a_live_one_and_goes_on_when_it_is_killed(tmp_path):
    build_directory = tmp_path / "tokenmill_native"
    build_directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, pathlib
        from tokenmill.layers.kernels.extension import exclusive_build
        with exclusive_build(pathlib.Path({str(build_directory)!r})):
            (pathlib.Path({str(build_directory)!r}) / "lock").touch()  # torch's baton, mid-build
            print("building", flush=True)
            sys.stdin.read()  # "builds" until killed
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "building"
        entered = threading.Event()

        def second_builder():
            with exclusive_build(build_directory):
                entered.set()

        waiter = threading.Thread(target=second_builder, daemon=True)
        waiter.start()
        assert not entered.wait(0.5), "entered while a live builder held the lock"
        holder.kill()
        holder.wait(timeout=30)
        assert entered.wait(30), "still waiting after the builder died"
        assert not (build_directory / "lock").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
