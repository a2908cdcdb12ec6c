"""distsent: a distributed trainer for recurrent text classifiers (binary or multi-class), built on Hugging Face
Accelerate."""

__version__ = "0.1.0"


def skip_final_collection() -> None:
    """For the command-line programs, not for a library import: at interpreter exit, after the other exit handlers
    (W&B's, torch's), freeze the objects left so the interpreter's final garbage collections pass them by. With
    torch and its compiler stack imported those collections take about a second, in every process of every run;
    all they would free is memory the operating system takes back at exit anyway. distsent closes every file it
    writes before then."""
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once, however often a program's main() is called in one process
    atexit.register(gc.freeze)  # registered before the others: run after them
