from skybot_cleanup.cli import main

main()
