"""The README's commands run as written: every main.py (and scripts/eval_suite.py) command in it parses
with today's flags."""
import re
import shlex
import sys

import pytest

import main
from tinyrun import REPO


def readme_commands():
    """Shell commands of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / 'README.md').read_text()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


MAIN_COMMANDS = [words for words in readme_commands() if 'main.py' in words]
SUITE_COMMANDS = [words for words in readme_commands() if 'scripts/eval_suite.py' in words]


def test_the_readme_shows_main_py_commands():
    assert len(MAIN_COMMANDS) >= 3


@pytest.mark.parametrize('words', MAIN_COMMANDS, ids=lambda w: ' '.join(w[:6]))
def test_readme_main_py_command_parses(words):
    argv = words[words.index('main.py') + 1:]
    args = main.parse_args(argv)  # argparse exits (code 2) on an unknown, abbreviated or malformed flag
    assert set(args.given) >= {a.lstrip('-').replace('-', '_') for a in argv if a.startswith('--')} - {
        'batch', 'disable_wandb', 'no_repeated_aug', 'no_model_ema', 'no_pin_mem', 'no_train_mode'}


@pytest.mark.parametrize('words', SUITE_COMMANDS, ids=lambda w: ' '.join(w[:6]))
def test_readme_eval_suite_command_parses(words):
    sys.path.insert(0, str(REPO / 'scripts'))
    import eval_suite
    suite, args = eval_suite.parse_args(words[words.index('scripts/eval_suite.py') + 1:])
    assert suite.roots and args.eval and (args.finetune or args.resume) == suite.ckpt
