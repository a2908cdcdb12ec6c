"""distsent: a distributed trainer for recurrent text classifiers (binary or multi-class), built on Hugging Face
Accelerate."""

__version__ = "0.1.0"

_exit_freeze = False


def skip_final_collection() -> None:
    """For the command-line programs, not for a library import: at interpreter exit, after the exit handlers
    registered once the program started (W&B's among them), freeze the objects left so that the interpreter's final
    garbage collections pass them by. With torch and its compiler stack loaded those collections take about a
    second, in every process of every run; all they would free is memory the operating system takes back at exit
    anyway. distsent closes every file it writes before then; objects caught in reference cycles are never
    finalized at all, which loses nothing of ours."""
    global _exit_freeze
    if not _exit_freeze:  # once: registered again, it would run before handlers registered in between
        import atexit
        import gc

        atexit.register(gc.freeze)  # exit handlers run last-registered first: this one after those that follow
        _exit_freeze = True
