"""The page's Markdown renderer (gateway/static/markdown.js), case by case, in Chromium.

Each input is rendered by the real script in headless Chromium and compared with
the HTML it must produce. Raw HTML and entities stay text, links are kept only for
http(s) and mailto (with rel="noopener noreferrer"), unfinished constructs (an open
code fence while streaming) render stably, and nothing runs (no dialog, no error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.js_support import require_chromium, run_node

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

SCRIPT = Path(__file__).parent.parent / "gateway" / "static" / "markdown.js"
_A = 'target="_blank" rel="noopener noreferrer"'

# (markdown, the innerHTML it renders to)
CASES: list[tuple[str, str]] = [
    ('plain text',
     '<p>plain text</p>'),
    ('two\nlines\n\nnew paragraph',
     '<p>two<br>lines</p><p>new paragraph</p>'),
    ('**bold** *em* _em_ ~~gone~~ `co*de*`',
     '<p><strong>bold</strong> <em>em</em> <em>em</em> <del>gone</del> <code>co*de*</code></p>'),
    ('snake_case_name and 2*3*4',
     '<p>snake_case_name and 2<em>3</em>4</p>'),
    ('\\*not em\\* and \\`not code\\`',
     '<p>*not em* and `not code`</p>'),
    ('`` code with ` tick ``',
     '<p><code>code with ` tick</code></p>'),
    ('[site](https://example.com) [mail](mailto:a@example.com) [rel](/local)',
     '<p><a href="https://example.com" ' + _A + '>site</a> <a href="mailto:a@example.com" ' + _A + '>mail</a> [rel](/local)</p>'),  # noqa: E501
    ('[x](javascript:alert(1)) [y](JaVaScRiPt:alert(1)) [z](data:text/html,hi) [v](vbscript:x)',
     '<p>[x](javascript:alert(1)) [y](JaVaScRiPt:alert(1)) [z](data:text/html,hi) [v](vbscript:x)</p>'),  # noqa: E501
    ('[t](https://example.com "title")',
     '<p><a href="https://example.com" ' + _A + '>t</a></p>'),
    ('<https://example.com/a> <javascript:alert(1)> see https://example.com/b, ok',
     '<p><a href="https://example.com/a" ' + _A + '>https://example.com/a</a> &lt;javascript:alert(1)&gt; see <a href="https://example.com/b" ' + _A + '>https://example.com/b</a>, ok</p>'),  # noqa: E501
    ('<b>bold?</b> <img src=x onerror=alert(1)> <script>alert(1)</script>',
     '<p>&lt;b&gt;bold?&lt;/b&gt; &lt;img src=x onerror=alert(1)&gt; &lt;script&gt;alert(1)&lt;/script&gt;</p>'),  # noqa: E501
    ('&lt;b&gt; &amp; &#x3C;script&#x3E;',
     '<p>&amp;lt;b&amp;gt; &amp;amp; &amp;#x3C;script&amp;#x3E;</p>'),
    ('# H1\n## H2 ##\n###### H6\n####### seven',
     '<h1>H1</h1><h2>H2</h2><h6>H6</h6><p>####### seven</p>'),
    ('- a\n- b\n  - c\n    - d\n- e',
     '<ul><li>a</li><li>b<ul><li>c<ul><li>d</li></ul></li></ul></li><li>e</li></ul>'),
    ('1. one\n2. two\n\n3) three',
     '<ol><li>one</li><li>two</li><li>three</li></ol>'),
    ('5. five\n6. six',
     '<ol start="5"><li>five</li><li>six</li></ol>'),
    ('* star\n+ plus',
     '<ul><li>star</li><li>plus</li></ul>'),
    ('- loose\n\n- items',
     '<ul><li>loose</li><li>items</li></ul>'),
    ('> quoted **bold**\n> more',
     '<blockquote><p>quoted <strong>bold</strong><br>more</p></blockquote>'),
    ('| a | b | c |\n|:--|:-:|--:|\n| 1 | 2 | 3 |\n| x \\| y | | |',
     '<div class="table-wrap"><table><thead><tr><th style="text-align: left;">a</th><th style="text-align: center;">b</th><th style="text-align: right;">c</th></tr></thead><tbody><tr><td style="text-align: left;">1</td><td style="text-align: center;">2</td><td style="text-align: right;">3</td></tr><tr><td style="text-align: left;">x | y</td><td style="text-align: center;"></td><td style="text-align: right;"></td></tr></tbody></table></div>'),  # noqa: E501
    ("```js\nconst a = '<b>';\n```",
     '<div class="code-block"><div class="code-head"><span class="code-lang">js</span><button class="copy-code" type="button" aria-label="Copy code">Copy</button></div><pre><code>const a = \'&lt;b&gt;\';</code></pre></div>'),  # noqa: E501
    ('~~~\nno lang\n~~~',
     '<div class="code-block"><div class="code-head"><span class="code-lang">code</span><button class="copy-code" type="button" aria-label="Copy code">Copy</button></div><pre><code>no lang</code></pre></div>'),  # noqa: E501
    ('```\nunclosed while streaming',
     '<div class="code-block"><div class="code-head"><span class="code-lang">code</span><button class="copy-code" type="button" aria-label="Copy code">Copy</button></div><pre><code>unclosed while streaming</code></pre></div>'),  # noqa: E501
    ('**unclosed bold',
     '<p>**unclosed bold</p>'),
    ('---\n***',
     '<hr><hr>'),
    ('text\n- list right after',
     '<p>text</p><ul><li>list right after</li></ul>'),
    ('line with trailing http://example.com/x).',
     '<p>line with trailing <a href="http://example.com/x" ' + _A + '>http://example.com/x</a>).</p>'),

]

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)><script>alert(2)</script></svg>",
    "[a](javascript:alert(1)) [b](  javascript:alert(1)) [c](java\nscript:alert(1))",
    "[d](https://ok.example/\" onmouseover=\"alert(1)) <iframe src=javascript:alert(1)>",
    "<a href=javascript:alert(1)>x</a> <details open ontoggle=alert(1)>",
    "```\n</code></pre><img src=x onerror=alert(1)>\n```",
    "| <img src=x onerror=alert(1)> |\n|---|\n| <script>alert(1)</script> |",
]


async def test_markdown_renders_each_case() -> None:
    chromium = require_chromium()
    out = await run_node("markdown_cases.mjs", json.dumps({
        "chromium": chromium, "script": str(SCRIPT), "cases": [c for c, _ in CASES],
    }))
    assert out["dialogs"] == [] and out["errors"] == []
    for (markdown, expected), got in zip(CASES, out["html"], strict=True):
        assert got == expected, markdown


async def test_hostile_markdown_runs_nothing_and_stays_text() -> None:
    chromium = require_chromium()
    out = await run_node("markdown_cases.mjs", json.dumps({
        "chromium": chromium, "script": str(SCRIPT), "cases": HOSTILE,
    }))
    assert out["dialogs"] == [] and out["errors"] == []
    for markdown, html in zip(HOSTILE, out["html"], strict=True):
        for tag in ("<img", "<svg", "<script", "<iframe", "<details", "<a href=\"java"):
            assert tag not in html, (markdown, html)
        for tag in re.findall(r"<[a-z][^>]*>", html):
            assert not re.search(r"\son\w+=", tag), (markdown, tag)
        assert "alert(1)" in html  # shown as text
