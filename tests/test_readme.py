"""The documentation's commands run as written and its links lead somewhere: every main.py (and
scripts/eval_suite.py) command in README.md and docs/*.md parses with today's flags, and every relative link
in them names a file of the repository (and a heading of it, for an #anchor)."""
import re
import shlex
import sys

import pytest

import main
from tinyrun import REPO

PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```.*?^```', flags=re.S | re.M)


def page_name(path):
    return path.relative_to(REPO).as_posix()


def page_commands(path):
    """Shell commands of a page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', path.read_text(), flags=re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def commands_running(script):
    return [pytest.param(words, id=f"{page_name(path)}: {' '.join(words[:6])}")
            for path in PAGES for words in page_commands(path) if script in words]


MAIN_COMMANDS = commands_running('main.py')
SUITE_COMMANDS = commands_running('scripts/eval_suite.py')


def test_the_readme_shows_main_py_commands():
    assert len(MAIN_COMMANDS) >= 3
    assert sum(p.id.startswith('README.md: ') for p in MAIN_COMMANDS) >= 3  # the released ones, on the front page


@pytest.mark.parametrize('words', MAIN_COMMANDS)
def test_readme_main_py_command_parses(words):
    argv = words[words.index('main.py') + 1:]
    args = main.parse_args(argv)  # argparse exits (code 2) on an unknown, abbreviated or malformed flag
    assert set(args.given) >= {a.lstrip('-').replace('-', '_') for a in argv if a.startswith('--')} - {
        'batch', 'disable_wandb', 'no_repeated_aug', 'no_model_ema', 'no_pin_mem', 'no_train_mode'}


@pytest.mark.parametrize('words', SUITE_COMMANDS)
def test_readme_eval_suite_command_parses(words):
    sys.path.insert(0, str(REPO / 'scripts'))
    import eval_suite
    suite, args = eval_suite.parse_args(words[words.index('scripts/eval_suite.py') + 1:])
    assert suite.roots and args.eval and (args.finetune or args.resume) == suite.ckpt


# ---- links ------------------------------------------------------------------------------------------------------

def prose(path):
    """A page without its fenced blocks and inline code, where '[x](y)' and '# ...' are not markdown."""
    return re.sub(r'`[^`\n]*`', '', FENCE.sub('', path.read_text()))


def anchors(path):
    """The #anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, and
    -1, -2, ... after a repeated one."""
    seen, out = {}, set()
    for heading in re.findall(r'^#{1,6} +(.+?) *$', FENCE.sub('', path.read_text()), flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.replace('`', '').lower()).replace(' ', '-')
        out.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(path):
    """(target file, anchor) of each link and image on the page that names no scheme (http:, mailto:, ...)."""
    links = []
    for target in re.findall(r'\]\(([^)\s]+)\)', prose(path)):
        if not re.match(r'[a-z][a-z0-9+.-]*:', target):
            file, _, anchor = target.partition('#')
            links.append(((path.parent / file).resolve() if file else path, anchor))
    return links


@pytest.mark.parametrize('path', PAGES, ids=page_name)
def test_relative_links_resolve(path):
    links = relative_links(path)
    assert links
    broken = [(target, anchor) for target, anchor in links
              if not (target.is_relative_to(REPO) and target.exists())
              or anchor and (target.suffix != '.md' or anchor not in anchors(target))]
    assert not broken, f'{page_name(path)} links to what is not there: ' + ', '.join(
        f"{page_name(t) if t.is_relative_to(REPO) else t}{'#' * bool(a)}{a}" for t, a in broken)


def test_readme_links_every_docs_page():
    readme = REPO / 'README.md'
    docs = PAGES[1:]
    assert docs, 'docs/*.md is gone'
    unlinked = [page_name(page) for page in docs if page not in {t for t, _ in relative_links(readme)}]
    assert not unlinked, f'README.md does not link {unlinked}'
    no_way_back = [page_name(page) for page in docs if readme not in {t for t, _ in relative_links(page)}]
    assert not no_way_back, f'no link back to README.md from {no_way_back}'
