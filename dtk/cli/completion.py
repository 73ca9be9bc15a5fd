"""Shell completion: file names where an option takes a path, and fish descriptions kept whole.

click completes file names only for options of type ``click.Path``; dtk's path options are plain strings
(a --model may also be a hub id, --data may be ``-``), so TAB offered nothing for them. They are made
``click.Path`` here, by name, once for every command (the conversion is the same: the text as given).
"""

from __future__ import annotations

import click
from click.shell_completion import FishComplete, add_completion_class

# parameters (click names) that take a file or directory, in any command
PATH_PARAMS = frozenset({
    "prompts_file", "prompts", "data", "model", "models", "model_config", "loras", "npo", "guide_with", "teacher",
    "baseline", "real_dir", "clip_model", "resume", "out", "pairs_out", "tracks", "video", "ply", "depth",
    "depth_model", "queries", "eval_gt", "viz",
})


def with_path_completion(command: click.Command) -> click.Command:
    for p in command.params:
        if p.name in PATH_PARAMS and isinstance(p.type, click.types.StringParamType):
            p.type = click.Path()
    return command


class _FishComplete(FishComplete):
    """click's fish script splits "type,value<TAB>help" at every comma, so descriptions stopped at their first
    comma; this one splits at the first only."""

    source_template = FishComplete.source_template.replace('(string split "," $completion)',
                                                           '(string split -m 1 "," $completion)')


add_completion_class(_FishComplete, "fish")
