"""The README's commands run as written: every main.py command in it parses with today's flags."""
import re
import shlex

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


def test_the_readme_shows_main_py_commands():
    assert len(MAIN_COMMANDS) >= 3


@pytest.mark.parametrize('words', MAIN_COMMANDS, ids=lambda w: ' '.join(w[:6]))
def test_readme_main_py_command_parses(words):
    argv = words[words.index('main.py') + 1:]
    args = main.parse_args(argv)  # argparse exits (code 2) on an unknown, abbreviated or malformed flag
    assert set(args.given) >= {a.lstrip('-').replace('-', '_') for a in argv if a.startswith('--')} - {
        'batch', 'disable_wandb', 'no_repeated_aug', 'no_model_ema', 'no_pin_mem', 'no_train_mode'}
