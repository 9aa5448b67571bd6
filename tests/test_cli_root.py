from scarches_fl_cli.main import build_parser, main


def test_help_lists_commands(capsys):
    parser = build_parser()
    assert parser.prog == "scarches-fl"
    rc = main([])
    assert rc == 2
    assert "usage: scarches-fl" in capsys.readouterr().out
