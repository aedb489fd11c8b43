from cema_deploy.cli import main

main()
