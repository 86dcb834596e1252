"""The learner's command: minqkv exercise list | start | check | hint | solution.

start copies an exercise's stub into a workspace folder (./minqkv-exercises by default), the learner
fills in its blank, and check grades that copy; the package's own files are only ever read.
"""

from __future__ import annotations

import shlex

from . import DEFAULT_WORKSPACE, EXERCISES


def add_exercise_parser(sub, HelpFormatter) -> None:
    """`minqkv exercise ...` on the command's subparsers; HelpFormatter: the command's help style."""
    p = sub.add_parser("exercise", help="a learner's mode: write a blanked piece of minqkv yourself, then grade it",
                       description="Write a piece of minqkv yourself: `start NAME` copies a stub into a workspace "
                                   "folder, you fill in its blank, `check NAME` grades it.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="the exercises, with about how many minutes each takes")
    names = dict(choices=list(EXERCISES), metavar="NAME", help="the exercise (see `minqkv exercise list`)")
    workspace = dict(default=DEFAULT_WORKSPACE, help="the workspace folder that holds your copies")
    start = actions.add_parser("start", help="copy the exercise's stub into the workspace",
                               formatter_class=HelpFormatter)
    start.add_argument("name", **names)
    start.add_argument("--dir", **workspace)
    start.add_argument("--force", action="store_true", help="replace your copy if it exists (your work is lost)")
    check = actions.add_parser("check", help="grade your copy: each check's pass or failure, and why",
                               formatter_class=HelpFormatter)
    check.add_argument("name", **names)
    check.add_argument("--dir", **workspace)
    check.add_argument("--file", default=None, help="grade this file instead of the workspace's NAME.py")
    hint = actions.add_parser("hint", help="hints, from a nudge to nearly the answer")
    hint.add_argument("name", **names)
    solution = actions.add_parser("solution", help="print the solution (or --write it into the workspace)",
                                  formatter_class=HelpFormatter)
    solution.add_argument("name", **names)
    solution.add_argument("--write", action="store_true", help="copy it into the workspace instead of printing it")
    solution.add_argument("--dir", **workspace)
    solution.add_argument("--force", action="store_true", help="with --write: replace your copy if it exists")
    p.set_defaults(run=cmd_exercise, print_help=p.print_help)


def cmd_exercise(args) -> int:
    from . import workspace  # the grader imports the model: only when an exercise runs

    if args.action is None:
        args.print_help()
        return 0
    if args.action == "list":
        print(workspace.listing())
    elif args.action == "start":
        path = workspace.start(args.name, args.dir, args.force)
        print(f"wrote {path}: fill in its blank, then run "
              f"`minqkv exercise check {args.name} --dir {shlex.quote(args.dir)}`")
    elif args.action == "check":
        path = args.file if args.file is not None else workspace.learner_path(args.name, args.dir)
        outcomes = workspace.check(args.name, path)
        print(workspace.report(args.name, path, outcomes))
        return 0 if all(o.passed for o in outcomes) else 1
    elif args.action == "hint":
        print(workspace.hints(args.name))
    elif args.write:
        print(f"wrote {workspace.write_solution(args.name, args.dir, args.force)}")
    else:
        print(workspace.solution_path(args.name).read_text(), end="")
    return 0
